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
use crate::replication::ReplicationLog;
use crate::store::BlockStore;
use crate::topology::{LiveTopology, NodeId, Tier, Topology};
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

/// Each block's set, with the sequence number of its record in the log once written.
type SetMap = HashMap<BlockId, (SiblingSet, Option<u64>)>;

/// The replica sets of the blocks finalized on this node, and an inbox of the blocks a
/// write left under-replicated. The pipeline records; the repair service reads. With the
/// repair service the sets are also kept in a durable log (the replication log's format,
/// one record per block and genstamp, the one it replaces marked done), so a restarted
/// node still knows them; without it they live in memory only and nothing reads the inbox.
#[derive(Default)]
pub(crate) struct Siblings {
    /// Each block's set, with its record's sequence number in the log.
    map: Arc<Mutex<SetMap>>,
    /// Blocks finalized with `lost` nodes, for the repair service (`None`: no service).
    inbox: Mutex<Option<Vec<BlockId>>>,
    pub(crate) wake: Notify,
    log: std::sync::OnceLock<(ReplicationLog, Arc<LiveTopology>)>,
    /// Records being written in the background.
    writing: Arc<(std::sync::atomic::AtomicUsize, Notify)>,
}

impl std::fmt::Debug for Siblings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Siblings")
            .field("blocks", &self.map().len())
            .finish()
    }
}

impl Siblings {
    fn map(&self) -> std::sync::MutexGuard<'_, SetMap> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Turns the inbox on (the repair service calls this once, at start).
    pub(crate) fn open_inbox(&self) {
        *self.inbox.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    }

    /// Keeps the sets in the log in `dir` from now on, after loading the sets it holds
    /// (the newest per block; the older ones are marked done). Must run inside a tokio
    /// runtime; call once, before the node serves.
    pub(crate) fn persist(
        &self,
        dir: &std::path::Path,
        live: Arc<LiveTopology>,
    ) -> Result<(), crate::replication::ReplicationError> {
        let (log, records) = ReplicationLog::open(dir, 16 << 20)?;
        let topology = live.get();
        let ids = |v: &[String]| -> Vec<NodeId> {
            v.iter().filter_map(|n| topology.find_node(n)).collect()
        };
        let mut superseded = Vec::new();
        {
            let mut m = self.map();
            for t in records {
                let set = SiblingSet {
                    genstamp: t.genstamp,
                    len: t.len,
                    replicas: ids(&t.sources),
                    lost: ids(&t.targets),
                };
                match m.get(&t.block) {
                    Some((old, _)) if old.genstamp > set.genstamp => superseded.push(t.seq),
                    Some((_, old_seq)) => {
                        superseded.extend(*old_seq);
                        m.insert(t.block, (set, Some(t.seq)));
                    }
                    None => {
                        m.insert(t.block, (set, Some(t.seq)));
                    }
                }
            }
        }
        if !superseded.is_empty() {
            let log = log.clone();
            tokio::spawn(async move {
                for seq in superseded {
                    let _ = log.complete(seq).await;
                }
            });
        }
        let _ = self.log.set((log, live));
        Ok(())
    }

    /// Records the set of a replica finalized here; an older genstamp never replaces a
    /// newer one. With a log, the record is written in the background (a crash just
    /// after finalize may forget the set of that one block).
    pub(crate) fn record(&self, block: BlockId, set: SiblingSet) {
        let lost = !set.lost.is_empty();
        let old_seq = {
            let mut m = self.map();
            if m.get(&block)
                .is_some_and(|(old, _)| old.genstamp > set.genstamp)
            {
                return;
            }
            m.insert(block, (set.clone(), None))
                .and_then(|(_, seq)| seq)
        };
        if let Some((log, live)) = self.log.get() {
            let topo = live.get();
            let names = |v: &[NodeId]| v.iter().map(|&n| topo.node(n).name.clone()).collect();
            let task = crate::replication::Task {
                seq: 0,
                block,
                genstamp: set.genstamp,
                len: set.len,
                sources: names(&set.replicas),
                target_idc: String::new(),
                targets: names(&set.lost),
                created_ms: 0,
            };
            let (log, map, writing) = (log.clone(), self.map.clone(), self.writing.clone());
            writing.0.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
            tokio::spawn(async move {
                if let Ok(t) = log.append(task).await {
                    // Still this set: note where its record is. Replaced meanwhile: the
                    // record is stale at once.
                    let stale = {
                        let mut m = map.lock().unwrap_or_else(|e| e.into_inner());
                        match m.get_mut(&block) {
                            Some((now, seq @ None)) if *now == set => {
                                *seq = Some(t.seq);
                                false
                            }
                            _ => true,
                        }
                    };
                    if stale {
                        let _ = log.complete(t.seq).await;
                    }
                }
                if let Some(seq) = old_seq {
                    let _ = log.complete(seq).await;
                }
                if writing.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
                    writing.1.notify_waiters();
                }
            });
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

    /// Waits until the records written in the background are durable (a node that stops
    /// calls this first).
    pub(crate) async fn flush(&self) {
        loop {
            let done = self.writing.1.notified();
            if self.writing.0.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            done.await;
        }
    }

    /// The recorded set of `block`.
    pub(crate) fn get(&self, block: BlockId) -> Option<SiblingSet> {
        self.map().get(&block).map(|(s, _)| s.clone())
    }

    /// Every block whose set names `peer` as a holder.
    pub(crate) fn held_with(&self, peer: NodeId) -> Vec<(BlockId, SiblingSet)> {
        self.map()
            .iter()
            .filter(|(_, (s, _))| s.replicas.contains(&peer))
            .map(|(&b, (s, _))| (b, s.clone()))
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

    /// The topology in force (a snapshot: take it once per operation).
    pub(crate) fn topology(&self) -> Arc<Topology> {
        self.transport.topology()
    }

    /// A node's name in the topology.
    pub(crate) fn name(&self, n: NodeId) -> String {
        self.topology().node(n).name.clone()
    }

    /// The distance tier from this node to `peer` (`Node` for this node itself).
    pub(crate) fn tier_to(&self, peer: NodeId) -> Tier {
        if peer == self.me {
            Tier::Node
        } else {
            self.topology().tier(self.me, peer)
        }
    }
}
