//! What leaves the agent about flows: Prometheus metrics ([`metrics`], served by
//! [`metrics_http`]), the flow log of JSON lines ([`flow_log`]) and IPFIX records
//! ([`ipfix`]).
//!
//! Exporters never see the agent itself, as Hubble's exporters see only the flow type:
//! the flow log and IPFIX read the broadcast of flow messages
//! ([`crate::flows::FollowMessage`]), the metrics a [`metrics::Scrape`] that the agent
//! fills on each scrape through a closure `backplane run` hands to the server. Nothing
//! here imports the agent, the data path or the endpoints; the metrics registry imports
//! nothing of the agent at all.

pub mod flow_log;
pub mod ipfix;
pub mod metrics;
pub mod metrics_http;
