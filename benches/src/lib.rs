//! Shared pieces of backplane's benchmarks.

pub mod report;
