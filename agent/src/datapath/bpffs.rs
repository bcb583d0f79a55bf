//! bpffs and the pin directory: mounting bpffs when it is absent, preparing and locking
//! the pin directory, and checking what a previous agent pinned there before it is
//! reused (see [`super::pins`] and [`super::pin_layout`]).

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::maps::{Array, MapData};
use backplane_common::{
    DatapathConfig,
    config::CONFIG_INDEX,
    maps::{CONFIG, FLOW_EVENTS, FLOWS, PAYLOAD_SAMPLES, PIN_LAYOUT_VERSION},
};

use crate::{
    datapath::{
        DatapathError, DatapathOptions, pin_layout,
        pins::{self, PinCheck},
    },
    paths::{BPFFS_ROOT, links_dir},
};

/// `statfs(2)` magic number of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mounts bpffs at /sys/fs/bpf unless something is mounted there already.
pub fn ensure_bpffs() -> Result<(), DatapathError> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(DatapathError::Mounts)?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_src, target, fstype) = (fields.next(), fields.next(), fields.next());
        target == Some(BPFFS_ROOT) && fstype == Some("bpf")
    });
    if mounted {
        return Ok(());
    }
    log::info!("bpffs is not mounted; mounting it at {BPFFS_ROOT}");
    let path = PathBuf::from(BPFFS_ROOT);
    fs::create_dir_all(&path).map_err(|source| DatapathError::MountBpffs { path: path.clone(), source })?;
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, target, fstype) = (c("bpf"), c(BPFFS_ROOT), c("bpf"));
    // SAFETY: all pointers are valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(DatapathError::MountBpffs { path, source: io::Error::last_os_error() });
    }
    Ok(())
}

fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs is plain old data; zeroed is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is writable.
    if unsafe { libc::statfs(c.as_ptr(), &raw mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[expect(clippy::useless_conversion, reason = "f_type's width differs between targets")]
    Ok(i64::from(st.f_type))
}

/// Creates the pin directory (and its `links/`) on bpffs. What a previous agent left
/// there is kept: its maps are reused and its links adopted (see [`super::Datapath::load`]).
pub fn prepare_pin_dir(pin_dir: &Path) -> Result<(), DatapathError> {
    let err = |source| DatapathError::PinDir { path: pin_dir.to_owned(), source };
    fs::create_dir_all(pin_dir).map_err(err)?;
    let magic = fs_magic(pin_dir).map_err(err)?;
    if magic != BPF_FS_MAGIC {
        return Err(DatapathError::NotBpffs { path: pin_dir.to_owned(), magic });
    }
    for dir in [links_dir(pin_dir), pin_layout::maps_dir(pin_dir, PIN_LAYOUT_VERSION)] {
        fs::create_dir_all(&dir).map_err(|source| DatapathError::PinDir { path: dir, source })?;
    }
    Ok(())
}

/// Takes the pin directory's lock (`flock` on the directory) for as long as the returned
/// file is open: a second agent on the same pins would adopt, and fight over, a live
/// agent's links. The kernel releases the lock when the agent dies, even by `kill -9`.
pub fn lock_pin_dir(pin_dir: &Path) -> Result<fs::File, DatapathError> {
    use std::os::fd::AsRawFd as _;
    let dir = fs::File::open(pin_dir).map_err(|source| DatapathError::PinDir { path: pin_dir.to_owned(), source })?;
    // SAFETY: flock takes a descriptor we own and plain flags.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let source = io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(DatapathError::PinDirInUse { path: pin_dir.to_owned() });
        }
        return Err(DatapathError::PinDir { path: pin_dir.to_owned(), source });
    }
    Ok(dir)
}

/// Checks the maps pinned in `maps_dir` (this agent's layout, or the older one it
/// upgrades: see [`pin_layout`]) against the layouts the object defines: a map of
/// another layout would be misread by the new programs, so the start ends (nothing
/// touched; a previous data path stays attached and in force).
pub fn check_pins(
    object: &[u8],
    opts: &DatapathOptions,
    maps_dir: &Path,
    upgrading: bool,
) -> Result<PinCheck, DatapathError> {
    let sizes =
        [(FLOWS, opts.flow_table_size), (FLOW_EVENTS, opts.ring_size), (PAYLOAD_SAMPLES, opts.payload_ring_size)];
    let wanted = pins::object_layouts(object, &sizes).map_err(DatapathError::ObjectMaps)?;
    let mut check = pins::check_pinned_maps(maps_dir, &wanted)
        .map_err(|reason| DatapathError::PinnedMaps { path: maps_dir.to_owned(), reason })?;
    if upgrading {
        // An older layout's map whose values grew since is copied and zero-extended.
        check.mismatches.retain(|m| !super::pin_layout::grown_from(m.map, &m.pinned, &m.wanted));
    }
    if !check.mismatches.is_empty() {
        return Err(DatapathError::IncompatiblePins { path: opts.pin_dir.clone(), mismatches: check.mismatches });
    }
    for (map, pinned, asked) in &check.resized {
        log::warn!(
            "{map}: reusing the pinned map of {pinned} entries (asked for {asked}); the new size takes effect \
             after the pins are removed (`backplane run --detach-on-exit`, then start again)"
        );
    }
    Ok(check)
}

/// The configuration a previous agent left in the `CONFIG` map pinned in `maps_dir`, if
/// there is one of the right layout.
#[must_use]
pub fn pinned_config(maps_dir: &Path) -> Option<DatapathConfig> {
    let data = MapData::from_pin(maps_dir.join(CONFIG)).ok()?;
    let array: Array<MapData, DatapathConfig> = Array::try_from(aya::maps::Map::Array(data)).ok()?;
    array.get(&CONFIG_INDEX, 0).ok()
}
