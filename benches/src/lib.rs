//! Shared pieces of backplane's benchmarks.

#![expect(clippy::cast_precision_loss, reason = "packet counts and byte sizes far below 2^52 become rates")]

pub mod agent;
pub mod datapath;
pub mod isolation;
pub mod netfilter;
pub mod pktgen;
pub mod procfs;
pub mod report;
pub mod rulegen;
pub mod stats;
pub mod worker;
