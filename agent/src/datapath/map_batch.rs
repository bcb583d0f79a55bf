//! Reading a whole hash map with `BPF_MAP_LOOKUP_BATCH`.
//!
//! aya 0.14 walks a map with two syscalls per entry (next key, lookup); for a flow table
//! of 262,144 entries read every second that is half a million syscalls a second. The
//! batch command copies thousands of entries per call. Kernels or maps without it
//! (`EINVAL`, `ENOTSUPP`) make the caller fall back to aya's walk.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya::Pod;

/// `BPF_MAP_LOOKUP_BATCH` from `enum bpf_cmd`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Entries asked for per call. A hash map hands out whole buckets; a bucket larger
/// than this makes the kernel answer `ENOSPC`, which is then reported as unsupported.
const CHUNK: usize = 4096;
#[expect(clippy::cast_possible_truncation, reason = "4096 fits")]
const CHUNK_U32: u32 = CHUNK as u32;

/// `size_of::<T>()` as the `u32` the bpf syscall takes.
fn size_u32<T>() -> u32 {
    u32::try_from(size_of::<T>()).expect("attribute structs are small")
}

/// `union bpf_attr`, the member used by the `BPF_MAP_*_BATCH` commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Why a batch read did not complete.
#[derive(Debug)]
pub enum BatchError {
    /// The kernel or the map type has no batch lookup: use the per-entry walk.
    Unsupported(io::Error),
    Failed(io::Error),
}

/// Reads every entry of a hash map (also LRU) whose key and value are `K` and `V`.
///
/// The map must have exactly `size_of::<K>()` and `size_of::<V>()` as key and value
/// sizes, and `V`'s size must be a multiple of 8 (the kernel's value stride); callers
/// use the map through aya, which checked the sizes when it was opened.
pub fn lookup_all<K: Pod + Default, V: Pod + Default>(fd: BorrowedFd<'_>) -> Result<Vec<(K, V)>, BatchError> {
    assert_eq!(size_of::<V>() % 8, 0, "hash map batch values are 8-byte strided");
    let mut out = Vec::new();
    let mut keys = vec![K::default(); CHUNK];
    let mut values = vec![V::default(); CHUNK];
    // The batch token of a hash map is a bucket index (u32); 8 bytes leave room.
    let mut token_in = [0u8; 8];
    let mut token_out = [0u8; 8];
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK_U32,
            map_fd: u32::try_from(fd.as_raw_fd()).expect("fds are non-negative"),
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid BPF_MAP_LOOKUP_BATCH request: the key and value
        // buffers hold CHUNK elements of the map's key and value sizes, the tokens are
        // 8 bytes, and the attribute size passed is that of the struct.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &raw mut attr, size_u32::<BatchAttr>()) };
        let err = (rc < 0).then(io::Error::last_os_error);
        let n = (attr.count as usize).min(CHUNK);
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match err {
            None => {
                token_in = token_out;
                first = false;
            }
            // The end of the map.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Some(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP | 524 | libc::ENOSPC)) => {
                // 524 is the kernel-internal ENOTSUPP that BPF returns for this.
                return Err(BatchError::Unsupported(e));
            }
            Some(e) => return Err(BatchError::Failed(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd as _, FromRawFd as _, OwnedFd};

    use backplane_common::{FlowKey, FlowValue};

    use super::*;

    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_TYPE_LRU_HASH: u32 = 9;

    #[repr(C)]
    #[derive(Default)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }

    #[repr(C)]
    #[derive(Default)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i64> {
        // SAFETY: `attr` is a valid attribute struct for `cmd` (see the call sites).
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_u32::<T>()) };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
    }

    /// Needs root (`CAP_BPF`); skipped otherwise.
    #[test]
    fn reads_every_entry_of_an_lru_hash() {
        let mut create = CreateAttr {
            map_type: BPF_MAP_TYPE_LRU_HASH,
            key_size: size_u32::<FlowKey>(),
            value_size: size_u32::<FlowValue>(),
            max_entries: 20_000,
            map_flags: 0,
        };
        let fd = match bpf(BPF_MAP_CREATE, &mut create) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                eprintln!("skipped: {e} (needs root)");
                return;
            }
            Err(e) => panic!("BPF_MAP_CREATE: {e}"),
        };
        // SAFETY: the syscall returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).unwrap()) };
        assert!(matches!(lookup_all::<FlowKey, FlowValue>(fd.as_fd()), Ok(v) if v.is_empty()));
        let n = 9_000u32;
        for i in 0..n {
            let mut key = FlowKey { proto: 17, family: 4, ..FlowKey::default() };
            key.addr_lo[..4].copy_from_slice(&i.to_be_bytes());
            let value = FlowValue { packets: [u64::from(i), 1], ..FlowValue::default() };
            let mut attr = ElemAttr {
                map_fd: u32::try_from(fd.as_raw_fd()).unwrap(),
                key: std::ptr::from_ref(&key) as u64,
                value: std::ptr::from_ref(&value) as u64,
                ..ElemAttr::default()
            };
            bpf(BPF_MAP_UPDATE_ELEM, &mut attr).expect("update");
        }
        let all = lookup_all::<FlowKey, FlowValue>(fd.as_fd()).expect("batch lookup");
        assert_eq!(all.len(), n as usize);
        let mut seen: Vec<u32> = all
            .iter()
            .map(|(k, v)| {
                let i = u32::from_be_bytes(k.addr_lo[..4].try_into().unwrap());
                assert_eq!(v.packets, [u64::from(i), 1]);
                i
            })
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
    }
}
