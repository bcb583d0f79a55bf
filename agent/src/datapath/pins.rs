//! What a previous agent left pinned, and whether this agent can adopt it.
//!
//! A new agent (a restart, an upgrade, a start after `kill -9`) reuses the maps a
//! previous one pinned, so flows, counters and the rule generation in force carry on,
//! and takes over its pinned links by replacing the program on each link in one
//! `BPF_LINK_UPDATE` (see [`crate::datapath`]). This module checks the first half of
//! that bargain: a pinned map serves the new data path only if it has the type, key
//! size, value size and flags the new object defines (and, for arrays, the same number
//! of entries: an index past the end would silently miss). Hash tables and ring buffers
//! whose size differs from the options are reused as they are, with a warning.
//!
//! It also reads, for a pinned link, which interface it is attached to: aya's
//! `LinkInfo` does not say, so the pin is opened again and `BPF_OBJ_GET_INFO_BY_FD`
//! asked directly.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fmt,
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

use backplane_common::maps::PINNED_MAPS;

/// `BPF_OBJ_GET`.
const BPF_OBJ_GET: libc::c_long = 7;
/// `BPF_OBJ_GET_INFO_BY_FD`.
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `BPF_LINK_GET_FD_BY_ID` and `BPF_LINK_GET_NEXT_ID`.
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
/// `enum bpf_attach_type`: `BPF_TCX_INGRESS`, `BPF_TCX_EGRESS`.
pub const ATTACH_TCX_INGRESS: u32 = 46;
pub const ATTACH_TCX_EGRESS: u32 = 47;
/// `BPF_MAP_TYPE_ARRAY` and `BPF_MAP_TYPE_PERCPU_ARRAY`: their number of entries is
/// part of their layout.
const ARRAY_TYPES: [u32; 2] = [2, 6];
/// `BPF_LINK_TYPE_XDP`.
pub const LINK_TYPE_XDP: u32 = 6;
/// `BPF_LINK_TYPE_TCX`.
pub const LINK_TYPE_TCX: u32 = 11;

/// What must match for a pinned map to serve the data path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub flags: u32,
    pub max_entries: u32,
}

impl MapLayout {
    /// Whether a map of this layout can stand in for one of `wanted`'s.
    #[must_use]
    pub fn compatible_with(&self, wanted: &Self) -> bool {
        self.map_type == wanted.map_type
            && self.key_size == wanted.key_size
            && self.value_size == wanted.value_size
            && self.flags == wanted.flags
            && (!ARRAY_TYPES.contains(&self.map_type) || self.max_entries == wanted.max_entries)
    }
}

impl fmt::Display for MapLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "type {}, key {} bytes, value {} bytes, flags {:#x}, {} entries",
            self.map_type, self.key_size, self.value_size, self.flags, self.max_entries
        )
    }
}

/// A pinned map whose layout differs from the one this data path defines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub map: &'static str,
    pub pinned: MapLayout,
    pub wanted: MapLayout,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: pinned {}; this data path needs {}", self.map, self.pinned, self.wanted)
    }
}

/// What the pin directory holds for this data path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PinCheck {
    /// Maps pinned by a previous agent, reused as they are.
    pub reused: Vec<&'static str>,
    /// Maps reused with another size than asked for: (map, pinned, asked).
    pub resized: Vec<(&'static str, u32, u32)>,
    /// Maps whose layout does not fit: the start must not go on.
    pub mismatches: Vec<Mismatch>,
}

impl PinCheck {
    /// Whether a previous agent's maps are being adopted.
    #[must_use]
    pub fn adopting(&self) -> bool {
        !self.reused.is_empty()
    }
}

/// The layouts of the pinned maps the data path object defines, with the sizes
/// `max_entries` overrides (as the loader applies them).
pub fn object_layouts(object: &[u8], max_entries: &[(&str, u32)]) -> Result<BTreeMap<&'static str, MapLayout>, String> {
    let obj = aya_obj::Object::parse(object).map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for &name in PINNED_MAPS {
        let Some(map) = obj.maps.get(name) else { continue };
        let size = max_entries.iter().find(|(n, _)| *n == name).map_or(map.max_entries(), |(_, s)| *s);
        out.insert(
            name,
            MapLayout {
                map_type: map.map_type(),
                key_size: map.key_size(),
                value_size: map.value_size(),
                flags: map.map_flags(),
                max_entries: size,
            },
        );
    }
    Ok(out)
}

/// The layout of the map pinned at `path`, if something is pinned there.
fn pinned_layout(path: &Path) -> Result<Option<MapLayout>, String> {
    if !path.exists() {
        return Ok(None);
    }
    let info = aya::maps::MapInfo::from_pin(path).map_err(|e| crate::error::report(&e))?;
    let map_type = info.map_type().map_err(|e| crate::error::report(&e))? as u32;
    Ok(Some(MapLayout {
        map_type,
        key_size: info.key_size(),
        value_size: info.value_size(),
        flags: info.map_flags(),
        max_entries: info.max_entries(),
    }))
}

/// Compares every map pinned under `pin_dir` with the layout `wanted` gives it.
pub fn check_pinned_maps(pin_dir: &Path, wanted: &BTreeMap<&'static str, MapLayout>) -> Result<PinCheck, String> {
    let mut check = PinCheck::default();
    for (&name, want) in wanted {
        let path = pin_dir.join(name);
        let Some(pinned) = pinned_layout(&path).map_err(|e| format!("{}: {e}", path.display()))? else { continue };
        if !pinned.compatible_with(want) {
            check.mismatches.push(Mismatch { map: name, pinned, wanted: *want });
            continue;
        }
        check.reused.push(name);
        if pinned.max_entries != want.max_entries {
            check.resized.push((name, pinned.max_entries, want.max_entries));
        }
    }
    Ok(check)
}

/// What the kernel says about a pinned link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PinnedLinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// The interface of an XDP or TCX link; 0 once the interface is gone.
    pub ifindex: u32,
    /// Of a TCX link: [`ATTACH_TCX_INGRESS`] or [`ATTACH_TCX_EGRESS`]; else 0.
    pub attach_type: u32,
}

pub(crate) fn sys_bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-padded bpf_attr of 128 bytes that lives through the call;
    // the kernel reads (and for info, writes through the pointer inside) only that.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(rc) }
}

/// `BPF_MAP_GET_NEXT_KEY`.
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

/// The key after `key` in the map `fd` (the first key for `None`) into `next`, which
/// holds the map's key size; false at the end of the map. The one walk over a map's keys
/// of raw size (map fill for the metrics, the copy of an older pin layout).
pub(crate) fn next_key(fd: BorrowedFd<'_>, key: Option<&[u8]>, next: &mut [u8]) -> std::io::Result<bool> {
    let mut attr = [0u64; 16];
    attr[0] = u64::from(fd.as_raw_fd().cast_unsigned());
    attr[1] = key.map_or(0, |k| k.as_ptr() as u64);
    attr[2] = next.as_mut_ptr() as u64;
    match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Opens the object pinned at `path` (`BPF_OBJ_GET`).
pub(crate) fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)?;
    let mut attr = [0u64; 16];
    attr[0] = c.as_ptr() as u64;
    let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The type, id, program and interface of the link pinned at `path`.
pub fn link_info(path: &Path) -> std::io::Result<PinnedLinkInfo> {
    fd_link_info(&obj_get(path)?)
}

/// Every XDP and TCX link of the machine on interface `ifindex` (links that vanish while
/// they are listed are skipped).
pub fn links_on(ifindex: u32) -> std::io::Result<Vec<PinnedLinkInfo>> {
    let mut out = Vec::new();
    let mut id = 0u32;
    loop {
        let mut attr = [0u64; 16];
        attr[0] = u64::from(id);
        match sys_bpf(BPF_LINK_GET_NEXT_ID, &mut attr) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        // bpf_attr { start_id, next_id, .. }: the next id is the second u32.
        id = u32::try_from(attr[0] >> 32).unwrap_or(0);
        let mut attr = [0u64; 16];
        attr[0] = u64::from(id);
        let Ok(fd) = sys_bpf(BPF_LINK_GET_FD_BY_ID, &mut attr) else { continue };
        let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
        // SAFETY: BPF_LINK_GET_FD_BY_ID returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if let Ok(info) = fd_link_info(&fd)
            && info.ifindex == ifindex
            && matches!(info.link_type, LINK_TYPE_XDP | LINK_TYPE_TCX)
        {
            out.push(info);
        }
    }
}

fn fd_link_info(fd: &OwnedFd) -> std::io::Result<PinnedLinkInfo> {
    // struct bpf_link_info: type, id, prog_id, then a union at offset 16 whose xdp and
    // tcx members start with the ifindex.
    let mut info = [0u32; 64];
    let mut attr = [0u64; 16];
    attr[0] =
        u64::from(fd.as_raw_fd().cast_unsigned()) | (u64::try_from(std::mem::size_of_val(&info)).unwrap_or(0) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let ifindex = if matches!(info[0], LINK_TYPE_XDP | LINK_TYPE_TCX) { info[4] } else { 0 };
    let attach_type = if info[0] == LINK_TYPE_TCX { info[5] } else { 0 };
    Ok(PinnedLinkInfo { link_type: info[0], id: info[1], prog_id: info[2], ifindex, attach_type })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(map_type: u32, max_entries: u32) -> MapLayout {
        MapLayout { map_type, key_size: 8, value_size: 16, flags: 0, max_entries }
    }

    #[test]
    fn layouts_must_match_except_the_size_of_tables() {
        let hash = layout(1, 100);
        assert!(layout(1, 200).compatible_with(&hash), "a hash table of another size is reused");
        assert!(!layout(9, 100).compatible_with(&hash), "another type is not");
        assert!(!MapLayout { key_size: 12, ..hash }.compatible_with(&hash), "another key size is not");
        assert!(!MapLayout { value_size: 24, ..hash }.compatible_with(&hash), "another value size is not");
        assert!(!MapLayout { flags: 1, ..hash }.compatible_with(&hash), "other flags are not");
        assert!(!layout(6, 40).compatible_with(&layout(6, 41)), "an array of another length is not");
        assert!(layout(6, 41).compatible_with(&layout(6, 41)));
    }

    #[test]
    fn the_embedded_object_defines_every_pinned_map() {
        let layouts = object_layouts(crate::datapath::DATAPATH_OBJECT, &[("FLOWS", 1024)]).unwrap();
        for name in PINNED_MAPS {
            assert!(layouts.contains_key(name), "{name} is not in the object");
        }
        assert_eq!(layouts["FLOWS"].max_entries, 1024, "the size override applies");
        let flows = layouts["FLOWS"];
        assert_eq!(
            (flows.key_size, flows.value_size),
            (
                u32::try_from(size_of::<backplane_common::FlowKey>()).unwrap(),
                u32::try_from(size_of::<backplane_common::FlowValue>()).unwrap()
            )
        );
    }
}
