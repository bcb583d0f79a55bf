//! Every path the agent and the CLI use by default, in one place.

use std::path::{Path, PathBuf};

/// Where bpffs is (or gets) mounted.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// Parent of the per-node pin directories: `<BPF_PIN_ROOT>/<node>`.
pub const BPF_PIN_ROOT: &str = "/sys/fs/bpf/backplane";

/// Default control socket of the agent.
pub const DEFAULT_SOCKET: &str = "/run/backplane/backplane.sock";

/// Sub-directory of the pin directory that holds the pinned links of the ports.
pub const LINKS_SUBDIR: &str = "links";

/// File-name suffix of a port's pinned XDP link (`links/<ifname>.xdp`).
pub const XDP_LINK_SUFFIX: &str = "xdp";

/// File-name suffix of a port's pinned TC (TCX egress) link (`links/<ifname>.tc`).
pub const TC_LINK_SUFFIX: &str = "tc";

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

/// Pin path of one of a port's links.
#[must_use]
pub fn link_pin_path(pin_dir: &Path, ifname: &str, suffix: &str) -> PathBuf {
    links_dir(pin_dir).join(format!("{ifname}.{suffix}"))
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
            Path::new("/sys/fs/bpf/backplane/node-a/links/tap0.xdp")
        );
    }
}
