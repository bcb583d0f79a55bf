//! Interface names by ifindex, cached: a flow record names the ports its frames crossed
//! even after a port (a VM's tap) is gone.

use std::{collections::HashMap, ffi::CStr, sync::Mutex};

/// The host's interface names by ifindex, as last seen.
#[derive(Debug, Default)]
pub struct IfNames {
    names: Mutex<HashMap<u32, String>>,
}

impl IfNames {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the current name of an interface (from a link dump or event).
    pub fn remember(&self, ifindex: u32, name: &str) {
        let mut names = self.names.lock().expect("ifnames lock");
        if names.get(&ifindex).is_none_or(|old| old != name) {
            names.insert(ifindex, name.to_owned());
        }
    }

    /// The name of `ifindex`: cached, else asked from the kernel (and cached), else
    /// `if<N>` for an interface that is gone and was never seen.
    #[must_use]
    pub fn name(&self, ifindex: u32) -> String {
        if let Some(name) = self.names.lock().expect("ifnames lock").get(&ifindex) {
            return name.clone();
        }
        match index_to_name(ifindex) {
            Some(name) => {
                self.remember(ifindex, &name);
                name
            }
            None => format!("if{ifindex}"),
        }
    }
}

/// `if_indextoname(3)`.
#[must_use]
pub fn index_to_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes as if_indextoname requires.
    let ptr = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// `if_nametoindex(3)`; `None` if there is no such interface.
#[must_use]
pub fn name_to_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_resolves_and_unknown_falls_back() {
        let names = IfNames::new();
        assert_eq!(names.name(1), "lo");
        assert_eq!(name_to_index("lo"), Some(1));
        assert_eq!(names.name(999_999), "if999999");
        names.remember(999_999, "tap-gone");
        assert_eq!(names.name(999_999), "tap-gone");
    }
}
