//! backplane's agent as a library: the `backplane` binary is a thin CLI over it.

/// The compiled data path (eBPF object), embedded at build time.
pub static DATAPATH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/backplane-datapath"));
