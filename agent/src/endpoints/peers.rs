//! How the endpoints ask the other nodes and tell them: the [`Peers`] of this node, which
//! `crate::cluster::Cluster` implements over etcd. The endpoints hold their peers from
//! the start (none without `--etcd`) and the cluster's sync loop holds the endpoints: the
//! arrows point one way, nothing is injected late, and no `Arc` points back.
//!
//! Peers that are not reachable yet (before the sync loop runs) answer nothing and take
//! nothing: an arrival then works from what this node knows, as on a single node.

use std::sync::Arc;

use backplane_rules::MacAddr;
use futures_util::future::BoxFuture;

use crate::endpoints::model::{HandoverSet, Location};

/// The other nodes, as the endpoints of this node see them.
pub trait Peers: Send + Sync {
    /// Where the other nodes say an endpoint is now (asked on an arrival, not to miss a
    /// move that the last poll has not brought yet).
    fn location(&self, mac: MacAddr) -> BoxFuture<'_, Result<Option<Location>, String>>;

    /// The established flows another node published for an endpoint.
    fn flows(&self, mac: MacAddr) -> BoxFuture<'_, Result<Option<HandoverSet>, String>>;

    /// Tells the other nodes where an endpoint is now (in the background).
    fn publish_location(self: Arc<Self>, mac: MacAddr, location: Location);

    /// An endpoint left one of this node's ports: hands its flows (when known) to the node
    /// it arrives on, then says its port here is gone (`location`, released), in that
    /// order, in the background.
    fn publish_departure(self: Arc<Self>, mac: MacAddr, flows: Option<HandoverSet>, location: Location);

    /// Something to share changed here: share it soon rather than at the next period.
    fn kick(&self);
}
