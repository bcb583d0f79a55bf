//! Shared by the integration tests.
#![allow(dead_code, reason = "each test binary uses a different part")]

pub mod agent;
pub mod datapath;
pub mod frames;
pub mod hostile;
pub mod traffic;
