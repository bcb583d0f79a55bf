//! How lab objects are named, and how a name leads back to the process that made it.
//!
//! Every lab gets a fixed-width suffix of 7 base-36 digits: 5 for the creating process's
//! pid, 2 for a per-process counter. The pid makes labs of parallel test processes
//! distinct and lets [`crate::cleanup_stale`] tell a leftover of a dead process from an
//! object that a live one still uses.

use std::sync::atomic::{AtomicU32, Ordering};

/// Linux's limit on an interface name, in bytes, without the trailing NUL (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

const PID_DIGITS: usize = 5;
const COUNTER_DIGITS: usize = 2;
/// How many labs one process can have before suffixes repeat: `36^COUNTER_DIGITS`.
const COUNTER_SPAN: u32 = 36 * 36;
pub(crate) const SUFFIX_LEN: usize = PID_DIGITS + COUNTER_DIGITS;
const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// The kinds of host links a lab makes, with the letters that follow the prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkRole {
    Bridge,
    VethPort,
    TapPort,
    UplinkPort,
}

impl LinkRole {
    const ALL: [Self; 4] = [Self::Bridge, Self::VethPort, Self::TapPort, Self::UplinkPort];

    pub(crate) const fn tag(self) -> &'static str {
        match self {
            Self::Bridge => "br",
            Self::VethPort => "v",
            Self::TapPort => "t",
            Self::UplinkPort => "u",
        }
    }
}

/// A new suffix, unique within this process (for 1296 labs) and across live processes.
pub(crate) fn new_suffix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    suffix_for(std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// The suffix of the `counter`-th lab (modulo 1296) of process `pid`.
pub(crate) fn suffix_for(pid: u32, counter: u32) -> String {
    let counter = counter % COUNTER_SPAN;
    format!("{}{}", base36(pid, PID_DIGITS), base36(counter, COUNTER_DIGITS))
}

/// The pid encoded in a suffix made by [`new_suffix`].
pub(crate) fn owner_pid(suffix: &str) -> Option<u32> {
    if suffix.len() != SUFFIX_LEN {
        return None;
    }
    suffix.as_bytes()[..PID_DIGITS].iter().try_fold(0u32, |acc, &b| {
        let digit = DIGITS.iter().position(|&d| d == b)?;
        acc.checked_mul(36)?.checked_add(u32::try_from(digit).ok()?)
    })
}

/// A host link name: `<prefix><role tag><suffix>[<index>]`, checked against IFNAMSIZ.
pub(crate) fn link_name(prefix: &str, role: LinkRole, suffix: &str, index: Option<u32>) -> String {
    let mut name = format!("{prefix}{}{suffix}", role.tag());
    if let Some(index) = index {
        name.push_str(&index.to_string());
    }
    assert!(name.len() <= MAX_IFNAME_LEN, "interface name {name:?} is longer than {MAX_IFNAME_LEN} bytes");
    name
}

/// The suffix of a link name made by [`link_name`] with this prefix.
pub(crate) fn suffix_of_link<'a>(prefix: &str, name: &'a str) -> Option<&'a str> {
    let rest = name.strip_prefix(prefix)?;
    LinkRole::ALL.iter().find_map(|role| {
        let tail = rest.strip_prefix(role.tag())?;
        let suffix = tail.get(..SUFFIX_LEN)?;
        let index = &tail[SUFFIX_LEN..];
        let index_ok = match role {
            LinkRole::Bridge => index.is_empty(),
            _ => !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()),
        };
        (index_ok && owner_pid(suffix).is_some()).then_some(suffix)
    })
}

/// The namespace name of a lab host: `<prefix>-<suffix>-<vm>`.
pub(crate) fn netns_name(prefix: &str, suffix: &str, vm: &str) -> String {
    format!("{prefix}-{suffix}-{vm}")
}

/// The suffix of a namespace name made by [`netns_name`] with this prefix.
pub(crate) fn suffix_of_netns<'a>(prefix: &str, name: &'a str) -> Option<&'a str> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('-')?;
    let suffix = rest.get(..SUFFIX_LEN)?;
    let vm = rest[SUFFIX_LEN..].strip_prefix('-')?;
    (!vm.is_empty() && owner_pid(suffix).is_some()).then_some(suffix)
}

/// Panics unless `prefix` can start every lab name: 1 to 3 lowercase ASCII letters.
pub(crate) fn check_prefix(prefix: &str) {
    assert!(
        (1..=3).contains(&prefix.len()) && prefix.bytes().all(|b| b.is_ascii_lowercase()),
        "lab prefix {prefix:?} must be 1 to 3 lowercase ASCII letters (the project uses \"bp\")"
    );
}

/// Panics unless `name` is usable as a VM name inside a namespace name.
pub(crate) fn check_vm_name(name: &str) {
    assert!(
        !name.is_empty()
            && name.len() <= 32
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "VM name {name:?} must be 1 to 32 characters of [A-Za-z0-9_-]"
    );
}

fn base36(mut value: u32, width: usize) -> String {
    let mut out = vec![b'0'; width];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(value % 36) as usize];
        value /= 36;
    }
    assert_eq!(value, 0, "value does not fit in {width} base-36 digits");
    String::from_utf8(out).expect("base-36 digits are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_round_trips_the_pid() {
        let suffix = new_suffix();
        assert_eq!(suffix.len(), SUFFIX_LEN);
        assert_eq!(owner_pid(&suffix), Some(std::process::id()));
        assert_eq!(owner_pid(&format!("{}00", base36(4_194_304, PID_DIGITS))), Some(4_194_304));
    }

    #[test]
    fn suffixes_differ_within_a_process() {
        assert_ne!(new_suffix(), new_suffix());
    }

    #[test]
    fn link_names_fit_and_parse_back() {
        let suffix = "0k3x901";
        for role in LinkRole::ALL {
            let index = (role != LinkRole::Bridge).then_some(99);
            let name = link_name("bpx", role, suffix, index);
            assert!(name.len() <= MAX_IFNAME_LEN, "{name}");
            assert_eq!(suffix_of_link("bpx", &name), Some(suffix), "{name}");
        }
        assert_eq!(link_name("bp", LinkRole::VethPort, suffix, Some(3)), "bpv0k3x9013");
        assert_eq!(suffix_of_link("bp", "bpbr0k3x901"), Some(suffix));
        assert_eq!(suffix_of_link("bp", "bpv0k3x901"), None, "a port needs an index");
        assert_eq!(suffix_of_link("bp", "bpfoo"), None);
        assert_eq!(suffix_of_link("bp", "eth0"), None);
    }

    #[test]
    fn netns_names_parse_back() {
        assert_eq!(netns_name("bp", "0k3x901", "web"), "bp-0k3x901-web");
        assert_eq!(suffix_of_netns("bp", "bp-0k3x901-web"), Some("0k3x901"));
        assert_eq!(suffix_of_netns("bp", "bp-0k3x901-"), None);
        assert_eq!(suffix_of_netns("bp", "bp-short-web"), None);
    }
}
