//! What the services of one node share: its identity and topology, its block store, its
//! transport, its way across the DCI, its counters, and the channel its events go out on.
//!
//! The pipeline, the read service and the transfers each hold an `Arc<NodeContext>`;
//! none of them sees `Node`, which sits above them and builds the
//! context. State that only one service needs (the relays of blocks being written, the
//! pipeline's tuning, the replication queue) lives in that service, not here.

use std::sync::Arc;

use tokio::sync::broadcast;

use crate::block::{BlockId, GenStamp};
use crate::dci::Egress;
use crate::metrics::NodeMetrics;
use crate::store::BlockStore;
use crate::topology::{NodeId, Tier, Topology};
use crate::transport::Transport;

/// Things the embedding server must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeEvent {
    /// A write completed (or is continuing) with fewer replicas than it started with.
    UnderReplicated {
        /// The block.
        block: BlockId,
        /// Its generation stamp after recovery.
        genstamp: GenStamp,
        /// Replicas that hold it.
        replicas: Vec<NodeId>,
        /// Nodes dropped from the pipeline.
        failed: Vec<NodeId>,
    },
    /// A replica failed verification (found by a read) and should be replaced.
    CorruptReplica {
        /// The block.
        block: BlockId,
        /// The generation stamp read.
        genstamp: GenStamp,
        /// The node holding the bad replica.
        node: NodeId,
    },
}

/// See the [module docs](self).
pub(crate) struct NodeContext {
    pub(crate) me: NodeId,
    pub(crate) topology: Arc<Topology>,
    pub(crate) store: BlockStore,
    pub(crate) transport: Transport,
    pub(crate) dci: Egress,
    pub(crate) metrics: NodeMetrics,
    pub(crate) events: broadcast::Sender<NodeEvent>,
}

impl NodeContext {
    /// Sends an event; nobody listening is fine (events are advisory).
    pub(crate) fn emit(&self, e: NodeEvent) {
        let _ = self.events.send(e);
    }

    /// A node's name in the topology.
    pub(crate) fn name(&self, n: NodeId) -> &str {
        &self.topology.node(n).name
    }

    /// The distance tier from this node to `peer` (`Node` for this node itself).
    pub(crate) fn tier_to(&self, peer: NodeId) -> Tier {
        if peer == self.me {
            Tier::Node
        } else {
            self.topology.tier(self.me, peer)
        }
    }
}
