//! What the services of one node share: its identity and topology, its block store, its
//! transport, its way across the DCI, its counters, the channel its events go out on, and
//! what each of its replicas knows of the block's other replicas ([`Siblings`]: the pipeline
//! records it, repair reads it).
//!
//! The pipeline, the read service and the transfers each hold an `Arc<NodeContext>`;
//! none of them sees `Node`, which sits above them and builds the
//! context. State that only one service needs (the relays of blocks being written, the
//! pipeline's tuning, the replication queue) lives in that service, not here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, broadcast};

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
    pub(crate) siblings: Siblings,
}

/// What a finalized replica here knows of its block: the whole replica set it was written
/// with, and the nodes a pipeline recovery dropped without replacing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SiblingSet {
    pub(crate) genstamp: GenStamp,
    pub(crate) len: u64,
    /// Every holder, this node included.
    pub(crate) replicas: Vec<NodeId>,
    /// Dropped and not replaced: owed a repair.
    pub(crate) lost: Vec<NodeId>,
}

/// The replica sets of the blocks finalized on this node (kept in memory: a restarted node
/// starts empty and learns again from the blocks written and repaired after it), and an
/// inbox of the blocks a write left under-replicated. The pipeline records; the repair
/// service reads. Without a repair service nothing reads the inbox, and it is not kept.
#[derive(Debug, Default)]
pub(crate) struct Siblings {
    map: Mutex<HashMap<BlockId, SiblingSet>>,
    /// Blocks finalized with `lost` nodes, for the repair service (`None`: no service).
    inbox: Mutex<Option<Vec<BlockId>>>,
    pub(crate) wake: Notify,
}

impl Siblings {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<BlockId, SiblingSet>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Turns the inbox on (the repair service calls this once, at start).
    pub(crate) fn open_inbox(&self) {
        *self.inbox.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    }

    /// Records the set of a replica finalized here; an older genstamp never replaces a
    /// newer one.
    pub(crate) fn record(&self, block: BlockId, set: SiblingSet) {
        let lost = !set.lost.is_empty();
        {
            let mut m = self.map();
            if m.get(&block).is_some_and(|old| old.genstamp > set.genstamp) {
                return;
            }
            m.insert(block, set);
        }
        if lost
            && let Some(inbox) = self
                .inbox
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
        {
            inbox.push(block);
            self.wake.notify_one();
        }
    }

    /// The recorded set of `block`.
    pub(crate) fn get(&self, block: BlockId) -> Option<SiblingSet> {
        self.map().get(&block).cloned()
    }

    /// Every block whose set names `peer` as a holder.
    pub(crate) fn held_with(&self, peer: NodeId) -> Vec<(BlockId, SiblingSet)> {
        self.map()
            .iter()
            .filter(|(_, s)| s.replicas.contains(&peer))
            .map(|(&b, s)| (b, s.clone()))
            .collect()
    }

    /// Takes the blocks finalized under-replicated since the last call.
    pub(crate) fn take_lost(&self) -> Vec<BlockId> {
        self.inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }
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
