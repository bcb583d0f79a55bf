//! Builds the eBPF data path (ebpf/programs) for the bpf target with aya-build and
//! leaves its object in `OUT_DIR`, where `src/datapath/mod.rs` embeds it (`DATAPATH_OBJECT`).
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } =
        cargo_metadata::MetadataCommand::new().no_deps().exec().context("MetadataCommand::exec")?;
    let ebpf_package = packages
        .into_iter()
        .find(|cargo_metadata::Package { name, .. }| name.as_str() == "backplane-ebpf")
        .ok_or_else(|| anyhow!("backplane-ebpf package not found"))?;
    let cargo_metadata::Package { name, manifest_path, .. } = ebpf_package;
    let root_dir = manifest_path.parent().context("ebpf manifest has no parent")?.as_str().to_owned();
    aya_build::build_ebpf(
        [aya_build::Package { name: name.as_str(), root_dir: &root_dir, ..Default::default() }],
        aya_build::Toolchain::default(),
    )
}
