//! Replicated writes: the [`Writer`] that streams a block through a pipeline of nodes, the
//! relay that each node runs for it, and recovery when a node fails mid-write.
//!
//! The writer sends a `WriteBlock` to the first target naming the rest; each relay opens
//! the next hop the same way and answers a setup ack (sequence `u64::MAX`) carrying one
//! status per node from itself downstream. Data then flows as packets of whole chunks.
//! A relay verifies a packet's checksums (as the store reserves the write), forwards it
//! downstream *before* its own disk write completes, writes it, and acks upstream once its
//! own write and the downstream ack are both in; an ack carries one status per node. On
//! the last packet each relay finalizes its replica (durable) before acking, so the
//! writer's `close` returns only when every replica is finalized.
//!
//! The writer keeps a window of packets in flight, sized in bytes from the bandwidth-delay
//! product of the slowest hop (at least [`PipelineConfig::min_window_bytes`]). A relay
//! bounds its own
//! queue to the same window. When a node fails — an ack names it, or its stream breaks —
//! the writer drops it, bumps the generation stamp, rebuilds the pipeline with the
//! survivors (each truncates its `rbw` replica to the resume offset and takes the new
//! stamp) — joined, when [`WriteParams::spares`] offers one in the failed node's IDC, by
//! a replacement that a survivor first copies the acknowledged prefix to — resends the
//! unacknowledged packets and emits
//! [`NodeEvent::UnderReplicated`](crate::context::NodeEvent::UnderReplicated). It gives up only when every
//! replica of an IDC the write started with has failed.

//!
//! The pieces: [`Writer`] (`writer.rs`), the relay (`relay.rs`), and the prefix copy that
//! brings a spare into a recovering pipeline (`copy.rs`). `Pipelines` is the service a
//! node runs: it owns the pipeline tuning, the registry of relays and the handle on the
//! node's replication queue, and serves `WriteBlock` and `CopyBlock` streams.

mod copy;
mod relay;
mod window;
mod writer;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::block::{BlockId, ChecksumSpec, GenStamp};
use crate::context::NodeContext;
use crate::replication::ReplicationQueue;
use crate::store::ReplicaState;
use crate::topology::{IdcId, NodeId};
use crate::transport::{FrameReader, PeerRole, Source, Stream, TransportError};
use crate::wire::{CopyBlock, ErrorFrame, Frame, Status, TrafficClass, WriteBlock, WriteMode};

pub use writer::{AckHistogram, Writer};

/// Sequence number of the setup ack.
pub const SETUP_SEQ: u64 = u64::MAX;

/// Tuning of write pipelines.
///
/// The defaults differ from HDFS (64 KiB packets, 80 in flight) on purpose: measured on
/// the 2-core development machine, a 2+2 pipeline on loopback moved 84 MB/s at 18 CPU-s
/// per GB with 64 KiB packets and a 5 MiB window, and ~190 MB/s at 9.3 CPU-s per GB with
/// 1 MiB packets and a 16 MiB window: per-packet work (acks, TLS records, store
/// operations, wakeups) dominated, and the window was the limit because an ack waits for
/// the slowest replica's disk write (~10-30 ms here), not for the network RTT.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Data bytes per packet (a multiple of the chunk size is used).
    pub packet_bytes: usize,
    /// Smallest window of bytes in flight; the writer uses at least twice the
    /// bandwidth-delay product of the slowest DCI hop.
    pub min_window_bytes: usize,
    /// How long the last node's upstream waits for its ack; each node further up the
    /// pipeline (and the writer, first of all) waits [`ack_step`](Self::ack_step) more
    /// per node below it, so that the node next to a silent hop gives up first and names
    /// the node behind it.
    pub ack_timeout: Duration,
    /// Extra ack wait per downstream node (see [`ack_timeout`](Self::ack_timeout)).
    pub ack_step: Duration,
    /// Limit for setting up (or rebuilding) a pipeline.
    pub setup_timeout: Duration,
    /// How long a recovery waits for the old relay of the same block to finish.
    pub relay_handover_timeout: Duration,
    /// Write slots of this node: pipelines through it at once. A setup that finds none
    /// free is refused at once (`Status::Busy`) and the writer retries the whole
    /// pipeline; see `scheduler::gang`.
    pub max_writes: usize,
    /// How long a writer keeps retrying a pipeline that a busy node refused.
    pub admission_timeout: Duration,
    /// The least rate (bytes/s) a `sync` pipeline crossing the DCI is admitted with: the
    /// node that forwards across a link holds one of its *DCI slots* for that link while
    /// the pipeline runs, `max(1, rate / dci_min_rate)` of them, `rate` being what this
    /// node may send on the link (its static share of the budget, or its equal share
    /// with cluster-wide shares). A setup that finds none free is refused like one that
    /// finds no write slot, so the link's budget is reserved with the hops' slots, all
    /// or nothing, and admitted pipelines do not crawl into their ack timeouts. `0`:
    /// no DCI slots.
    pub dci_min_rate: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            packet_bytes: 1 << 20,
            min_window_bytes: 16 << 20,
            ack_timeout: Duration::from_secs(30),
            ack_step: Duration::from_secs(5),
            setup_timeout: Duration::from_secs(10),
            relay_handover_timeout: Duration::from_secs(10),
            max_writes: 1024,
            admission_timeout: Duration::from_secs(30),
            dci_min_rate: 2_000_000,
        }
    }
}

/// Per-write options.
#[derive(Debug, Clone)]
pub struct WriteParams {
    /// Generation stamp of the new block.
    pub genstamp: GenStamp,
    /// Chunking and checksum.
    pub checksum: ChecksumSpec,
    /// Traffic class of governed hops: the transfer's purpose.
    pub class: TrafficClass,
    /// `Spot`: on DCI hops the write uses idle capacity only and yields to every reserved
    /// transfer (and is reported to the shares allocator as spot demand). Nodes may also
    /// make whole classes spot (`[dci.shares] spot`).
    pub provisioning: crate::scheduler::shares::Provisioning,
    /// Nodes that may replace a failed target in the same IDC: on recovery, a survivor
    /// copies the acknowledged prefix to the first usable spare, which then joins the
    /// pipeline in the failed node's place. Without one, the survivors go on alone.
    pub spares: Vec<NodeId>,
    /// `Sync`: every target before the ack. `Async`: the targets in the first target's
    /// IDC before the ack; the rest is queued in the node's replication log (subject to
    /// its RPO policy, which may turn the write into a sync one).
    pub mode: WriteMode,
    /// On a node failure, drop the node and go on with the others at the next generation
    /// stamp (the default). `false` for copies of a replica that is already final: those
    /// keep their generation stamp, so a failed node fails the write
    /// ([`WriteError::NodeFailed`]) and the copy is retried as a whole.
    pub recover: bool,
    /// Nodes outside the pipeline that already hold the block at this genstamp (a copy
    /// adds replicas to them). Every replica records the whole set — these, the targets
    /// and the async remote targets — so that the survivors of a node loss can repair it.
    pub holders: Vec<NodeId>,
    /// Send the pipeline's setup with the block's first packet instead of when the writer
    /// is made: the `WriteBlock` and the first packet (for a block of one packet, the
    /// whole block and the end of the stream) go out in one write, the hops forward the
    /// packet while the hops after them are still being set up, and a small block costs
    /// one round trip through the pipeline instead of two. The writer is then returned
    /// without contacting any node, and a refused setup (the block exists, no write slot
    /// before the admission timeout, denied, an IDC with no reachable target) is the
    /// error of the `write`, `hflush`, `hsync` or `close` that sends the first packet.
    /// A hop writes the packet before it knows that the whole pipeline was set up, but
    /// finalizes nothing until it does, and removes the replica when the setup fails.
    /// Off by default.
    pub setup_with_first_packet: bool,
}

impl WriteParams {
    /// Defaults for a new block with `genstamp`.
    pub fn new(genstamp: GenStamp) -> Self {
        WriteParams {
            genstamp,
            checksum: ChecksumSpec::default(),
            class: TrafficClass::Sync,
            provisioning: crate::scheduler::shares::Provisioning::Reserved,
            spares: Vec::new(),
            mode: WriteMode::Sync,
            recover: true,
            holders: Vec::new(),
            setup_with_first_packet: false,
        }
    }
}

/// What a completed write produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteOutcome {
    /// The block.
    pub block: BlockId,
    /// Its final generation stamp (bumped once per recovery).
    pub genstamp: GenStamp,
    /// Committed length.
    pub len: u64,
    /// Nodes holding a finalized replica.
    pub replicas: Vec<NodeId>,
    /// Nodes dropped from the pipeline.
    pub failed: Vec<NodeId>,
    /// Async mode: remote targets queued (durably, in the pipeline head's replication
    /// log) for background replication.
    pub queued_remote: Vec<NodeId>,
}

/// Why a write failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The targets are empty, repeated, too many, or not in the topology.
    #[error("invalid pipeline targets: {0}")]
    InvalidTargets(String),
    /// Every replica in an IDC the write started with has failed.
    #[error("{block}: every replica in idc {idc} failed (failed nodes: {failed:?})")]
    IdcLost {
        /// The block.
        block: BlockId,
        /// The IDC left without a replica.
        idc: String,
        /// Nodes that failed.
        failed: Vec<String>,
    },
    /// A target refused the new block because it already holds it (finalized, or at a
    /// newer generation stamp): the block id was used before. Nothing was written.
    #[error("{block}: {node} already holds this block ({reason})")]
    BlockExists {
        /// The block.
        block: BlockId,
        /// The node that holds it.
        node: String,
        /// What the node said.
        reason: String,
    },
    /// A node refused the request because this node's certificate does not allow it (a
    /// client replacing a finalized replica, or recovering a write that is not its own).
    #[error("{block}: {node} refused: {reason}")]
    Denied {
        /// The block.
        block: BlockId,
        /// The node that refused.
        node: String,
        /// What it said.
        reason: String,
    },
    /// A node had no free write slot until the admission deadline
    /// ([`PipelineConfig::admission_timeout`]); nothing of the write is left anywhere.
    #[error("{block}: {node} had no free write slot within {waited:?} ({attempts} attempts)")]
    Busy {
        /// The block.
        block: BlockId,
        /// The node that refused last.
        node: String,
        /// How long the writer tried.
        waited: Duration,
        /// Setups refused.
        attempts: u32,
    },
    /// A node of a write that does not recover ([`WriteParams::recover`] false) failed.
    #[error("{block}: {node} failed: {reason}")]
    NodeFailed {
        /// The block.
        block: BlockId,
        /// The node.
        node: String,
        /// What happened.
        reason: String,
    },
    /// The writer failed earlier and cannot be used.
    #[error("{block}: writer already failed")]
    Failed {
        /// The block.
        block: BlockId,
    },
    /// More data than a block may hold.
    #[error("{block}: write beyond the maximum block size")]
    TooLarge {
        /// The block.
        block: BlockId,
    },
    /// Async mode on a node without a replication log, or the log failed.
    #[error("{block}: replication log: {source}")]
    Replication {
        /// The block.
        block: BlockId,
        /// Why.
        source: crate::replication::ReplicationError,
    },
}

/// A pipeline setup that did not go through: the position of the node that refused or
/// failed, and why.
struct SetupFailure {
    index: usize,
    /// What the node answered, when it answered.
    status: Option<Status>,
    why: String,
}

impl From<(usize, String)> for SetupFailure {
    fn from((index, why): (usize, String)) -> Self {
        SetupFailure {
            index,
            status: None,
            why,
        }
    }
}

/// The pipeline service of one node. See the [module docs](self).
pub(crate) struct Pipelines {
    pub(crate) ctx: Arc<NodeContext>,
    pub(crate) config: PipelineConfig,
    relays: relay::RelayRegistry,
    /// This node's replication queue: where an async pipeline headed here queues the
    /// remote copy, and whose RPO policy admits async writes from here.
    pub(crate) queue: Option<Arc<ReplicationQueue>>,
    /// Which client wrote each block written here by a client (bounded, oldest forgotten
    /// first): that client, and only it, may recover the write.
    origins: std::sync::Mutex<Origins>,
    /// This node's write slots (gang admission).
    slots: std::sync::Mutex<crate::scheduler::gang::Slots>,
    /// DCI slots of each link this node forwards sync pipelines across, by remote IDC.
    dci_slots: std::sync::Mutex<std::collections::HashMap<IdcId, crate::scheduler::gang::Slots>>,
}

/// Every DCI slot of the link is taken: the setup is refused as busy.
pub(crate) struct DciBusy;

/// A DCI slot held by a relay that forwards a sync pipeline across a link; given back
/// when dropped.
pub(crate) struct DciSlot(Arc<Pipelines>, IdcId);

impl Drop for DciSlot {
    fn drop(&mut self) {
        if let Some(slots) = self
            .0
            .dci_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&self.1)
        {
            slots.release();
        }
    }
}

/// A write slot held by a relay; given back when dropped.
pub(crate) struct WriteSlot(Arc<Pipelines>);

impl Drop for WriteSlot {
    fn drop(&mut self) {
        self.0
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .release();
    }
}

/// Blocks written here by clients, and by which; at most [`Origins::CAP`] of them.
#[derive(Default)]
struct Origins {
    by_block: std::collections::HashMap<BlockId, NodeId>,
    order: std::collections::VecDeque<BlockId>,
}

impl Origins {
    const CAP: usize = 1 << 16;

    fn get(&self, block: BlockId) -> Option<NodeId> {
        self.by_block.get(&block).copied()
    }

    fn record(&mut self, block: BlockId, writer: NodeId) {
        if self.by_block.insert(block, writer).is_none() {
            self.order.push_back(block);
            while self.order.len() > Self::CAP {
                if let Some(old) = self.order.pop_front() {
                    self.by_block.remove(&old);
                }
            }
        }
    }
}

impl Pipelines {
    pub(crate) fn new(
        ctx: Arc<NodeContext>,
        config: PipelineConfig,
        queue: Option<Arc<ReplicationQueue>>,
    ) -> Arc<Pipelines> {
        Arc::new(Pipelines {
            ctx,
            relays: Default::default(),
            queue,
            origins: Default::default(),
            slots: std::sync::Mutex::new(crate::scheduler::gang::Slots::new(config.max_writes)),
            dci_slots: Default::default(),
            config,
        })
    }

    /// Takes a write slot if one is free.
    pub(crate) fn try_slot(self: &Arc<Self>) -> Option<WriteSlot> {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        s.try_take().then(|| WriteSlot(self.clone()))
    }

    /// Takes a DCI slot for a sync pipeline forwarded to `to` (another IDC): `Ok(None)`
    /// when DCI slots are off or no link leads there, [`DciBusy`] when all are taken.
    pub(crate) fn try_dci_slot(self: &Arc<Self>, to: IdcId) -> Result<Option<DciSlot>, DciBusy> {
        let min = self.config.dci_min_rate;
        let Some(rate) = (min > 0).then(|| self.ctx.dci.admission_rate(to)).flatten() else {
            return Ok(None);
        };
        let mut held = self.dci_slots.lock().unwrap_or_else(|e| e.into_inner());
        let slots = held
            .entry(to)
            .or_insert_with(|| crate::scheduler::gang::Slots::new(0));
        slots.set_capacity((rate / min).max(1) as usize);
        if slots.try_take() {
            Ok(Some(DciSlot(self.clone(), to)))
        } else {
            Err(DciBusy)
        }
    }

    /// DCI slots in use, all links.
    pub(crate) fn dci_slots_used(&self) -> usize {
        self.dci_slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(crate::scheduler::gang::Slots::used)
            .sum()
    }

    /// Write slots in use.
    pub(crate) fn slots_used(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).used()
    }

    fn origins(&self) -> std::sync::MutexGuard<'_, Origins> {
        self.origins.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the peer of `s` may open this pipeline. A node may; a client may create a
    /// block that has no finalized replica here, and resume only its own write. Fills in
    /// the request's origin for the nodes downstream: the client itself, or (from a
    /// node) what that node said.
    fn authorize_write(&self, s: &Stream, req: &mut WriteBlock) -> Result<(), String> {
        let topo = self.ctx.topology();
        let origin = match s.role {
            PeerRole::Client => Some(s.peer),
            PeerRole::Node => req.origin.as_deref().and_then(|n| topo.node_by_name(n)),
        };
        req.origin = origin.map(|o| self.ctx.name(o));
        if s.role == PeerRole::Client {
            let own = self.origins().get(req.block) == Some(s.peer);
            match self.ctx.store.get(req.block) {
                Some(r) if !req.resume && r.state == ReplicaState::Finalized => {
                    return Err(format!(
                        "a client may not replace the finalized replica at {}",
                        r.genstamp
                    ));
                }
                Some(_) if !own => {
                    return Err("the replica here is another writer's".into());
                }
                // Resuming at offset 0 where there is no replica creates one: a new
                // block, which a client may always write.
                None if req.resume && req.offset > 0 => {
                    return Err("a client may only resume its own write".into());
                }
                _ => {}
            }
        }
        if let Some(o) = origin {
            self.origins().record(req.block, o);
        }
        Ok(())
    }

    /// Whether the peer of `s` may have this node copy a replica: a node may; a client
    /// only the prefix of its own write in progress (to bring a spare into it).
    fn authorize_copy(&self, s: &Stream, req: &CopyBlock) -> Result<(), String> {
        if s.role == PeerRole::Node {
            return Ok(());
        }
        let in_progress = self
            .ctx
            .store
            .get(req.block)
            .is_some_and(|r| r.state == ReplicaState::Rbw);
        if in_progress && self.origins().get(req.block) == Some(s.peer) {
            Ok(())
        } else {
            Err("a client may only copy its own write in progress".into())
        }
    }

    /// Relays registered now (blocks being written through this node).
    /// Asks `source` to copy its replica of `req.block` (the first `req.len` bytes, at
    /// `req.genstamp`) through a pipeline to `req.targets`; returns when the copy is
    /// done. The data goes from `source` to the targets, not through this node.
    pub(crate) async fn ask_copy(
        self: &Arc<Self>,
        source: NodeId,
        req: crate::wire::CopyBlock,
    ) -> Result<(), String> {
        copy::ask_copy(self, source, req).await
    }

    pub(crate) fn relay_count(&self) -> usize {
        self.relays.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Serves a stream whose first frame was `first`, if it is one of the pipeline's and
    /// the peer's role allows it.
    pub(crate) async fn serve(self: Arc<Self>, mut s: Stream, first: Frame) {
        match first {
            Frame::WriteBlock(mut req) => match self.authorize_write(&s, &mut req) {
                Ok(()) => relay::serve(self, s, req).await,
                Err(why) => {
                    tracing::warn!(block = %req.block, peer = %self.ctx.name(s.peer), reason = why, "write refused");
                    let _ = s
                        .writer
                        .send(&Frame::Ack(crate::wire::Ack {
                            seq: SETUP_SEQ,
                            statuses: vec![Status::Denied],
                        }))
                        .await;
                }
            },
            Frame::CopyBlock(req) => match self.authorize_copy(&s, &req) {
                Ok(()) => copy::serve(self, s, req).await,
                Err(message) => {
                    tracing::warn!(block = %req.block, peer = %self.ctx.name(s.peer), reason = message, "copy refused");
                    let _ = s
                        .writer
                        .send(&Frame::Error(ErrorFrame {
                            status: Status::Denied,
                            message,
                        }))
                        .await;
                }
            },
            other => refuse(s, &other).await,
        }
    }

    /// Reads a stream's first frame and serves it (the in-process first hop).
    async fn serve_stream(self: Arc<Self>, mut s: Stream) {
        match s.reader.recv().await {
            Ok(Some(first)) => self.serve(s, first).await,
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "bad first frame on an in-process hop"),
        }
    }
}

/// Answers a stream that opened with a frame nobody serves.
pub(crate) async fn refuse(mut s: Stream, first: &Frame) {
    let message = format!("unexpected first frame {:?}", std::mem::discriminant(first));
    let _ = s
        .writer
        .send(&Frame::Error(ErrorFrame {
            status: Status::Rejected,
            message,
        }))
        .await;
}

fn window_for(svc: &Pipelines, from: NodeId, chain: &[NodeId]) -> usize {
    let topo = svc.ctx.topology();
    let mut prev = from;
    let mut bdp = 0u64;
    for &n in chain {
        let (a, b) = (topo.location(prev).idc, topo.location(n).idc);
        if a != b {
            bdp = bdp.max(topo.link(a, b).map_or(0, |l| l.bdp_bytes()));
        }
        prev = n;
    }
    (2 * bdp as usize).max(svc.config.min_window_bytes)
}

/// Opens the hop to `peer`: over the transport, or in-process when the peer is this node
/// (the writer runs on its own first target, as HDFS clients on datanodes do).
fn open_hop(
    svc: &Arc<Pipelines>,
    peer: NodeId,
) -> impl Future<Output = Result<Stream, TransportError>> + Send + 'static {
    let svc = svc.clone();
    async move {
        if peer != svc.ctx.me {
            return svc.ctx.transport.open(peer).await;
        }
        let (ours, theirs) = svc.ctx.transport.local_pair(1 << 20);
        // Served like a stream a peer opens, without the network. Boxed: the service
        // reaches this function again (a relay opens hops), and the box breaks that
        // cycle for the compiler.
        let serve: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(svc.serve_stream(theirs));
        tokio::spawn(serve);
        Ok(ours)
    }
}

/// Reads the answer to a `WriteBlock`: the setup ack's statuses, one per node from the
/// receiver down.
async fn setup_answer(r: &mut FrameReader<Source>) -> Result<Vec<Status>, (usize, String)> {
    match r.recv().await {
        Ok(Some(Frame::Ack(a))) if a.seq == SETUP_SEQ => Ok(a.statuses),
        Ok(Some(Frame::Error(e))) => Err((0, format!("{:?}: {}", e.status, e.message))),
        Ok(other) => Err((0, format!("unexpected setup answer {other:?}"))),
        Err(e) => Err((0, e.to_string())),
    }
}
