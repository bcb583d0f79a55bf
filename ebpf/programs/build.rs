//! Rebuild the eBPF object when bpf-linker changes (it is the linker of the bpf target).
fn main() {
    let bpf_linker = which::which("bpf-linker").expect("bpf-linker on PATH (run `cargo xtask setup`)");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
