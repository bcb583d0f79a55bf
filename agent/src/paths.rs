//! Every path the agent and the CLI use by default, in one place.

use std::path::{Path, PathBuf};

/// Where bpffs is (or gets) mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Parent of the per-node pin directories: `<BPF_PIN_ROOT>/<node>`.
pub const BPF_PIN_ROOT: &str = "/sys/fs/bpf/backplane";

/// Parent of the per-node state directories: `<STATE_ROOT>/<node>`.
pub const STATE_ROOT: &str = "/var/lib/backplane";

/// Default state directory of a node (endpoint state, audit log).
#[must_use]
pub fn default_state_dir(node: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(node)
}

/// Default control socket of the agent.
pub const DEFAULT_SOCKET: &str = "/run/backplane/backplane.sock";

/// Sub-directory of the pin directory that holds the pinned links of the ports.
pub const LINKS_SUBDIR: &str = "links";

/// Kind of a port's pinned XDP link (`links/<ifname>:xdp`).
pub const XDP_LINK_SUFFIX: &str = "xdp";

/// Kind of a port's pinned TC (TCX egress) link (`links/<ifname>:tc`).
pub const TC_LINK_SUFFIX: &str = "tc";

/// Kind of a port's pinned TC ingress (TCX) link (`links/<ifname>:tcin`), the other
/// place `from_port` can run.
pub const TC_INGRESS_LINK_SUFFIX: &str = "tcin";

/// Separates the interface name from the link kind in a link pin's file name.
///
/// bpffs refuses names with a dot (`EPERM`: dots are reserved), so `<ifname>.xdp` cannot
/// exist. Interface names never contain `:`, which makes it an unambiguous separator;
/// a dot inside an interface name (`bond0.100`) is written as `:` too, and the kind is
/// always after the last `:`.
pub const LINK_KIND_SEPARATOR: char = ':';

/// Default pin directory of a node: `/sys/fs/bpf/backplane/<node>`.
#[must_use]
pub fn default_pin_dir(node: &str) -> PathBuf {
    Path::new(BPF_PIN_ROOT).join(node)
}

/// Directory of the pinned links under a pin directory.
#[must_use]
pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join(LINKS_SUBDIR)
}

/// File name of one of a port's link pins: `<ifname>:<kind>`, dots as `:`.
#[must_use]
pub fn link_pin_name(ifname: &str, kind: &str) -> String {
    format!("{}{LINK_KIND_SEPARATOR}{kind}", ifname.replace('.', ":"))
}

/// The kind (`xdp`, `tcin`, `tc`) of a link pin's file name, if it is one.
#[must_use]
pub fn link_pin_kind(file_name: &str) -> Option<&str> {
    let (_, kind) = file_name.rsplit_once(LINK_KIND_SEPARATOR)?;
    [XDP_LINK_SUFFIX, TC_INGRESS_LINK_SUFFIX, TC_LINK_SUFFIX].into_iter().find(|k| *k == kind)
}

/// Pin path of one of a port's links.
#[must_use]
pub fn link_pin_path(pin_dir: &Path, ifname: &str, kind: &str) -> PathBuf {
    links_dir(pin_dir).join(link_pin_name(ifname, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_paths() {
        let dir = default_pin_dir("node-a");
        assert_eq!(dir, Path::new("/sys/fs/bpf/backplane/node-a"));
        assert_eq!(
            link_pin_path(&dir, "tap0", XDP_LINK_SUFFIX),
            Path::new("/sys/fs/bpf/backplane/node-a/links/tap0:xdp")
        );
        assert_eq!(link_pin_name("bond0.100", TC_LINK_SUFFIX), "bond0:100:tc");
        assert!(!link_pin_name("a.b.c", XDP_LINK_SUFFIX).contains('.'));
        assert_eq!(link_pin_kind("bond0:100:tc"), Some("tc"));
        assert_eq!(link_pin_kind("tap0:xdp"), Some("xdp"));
        assert_eq!(link_pin_kind("tap0"), None);
        assert_eq!(link_pin_kind("tap0:foo"), None);
    }
}
