//! The storage server a process embeds: its block store, its transport, the relay side of
//! write pipelines and the read service.
//!
//! [`Node::start`] opens the store, binds the transport and serves every stream peers
//! open: a `WriteBlock` frame starts a pipeline relay, a `ReadBlock` a read. The node is
//! also the handle a local client uses to write ([`crate::pipeline::Writer`]) and read
//! ([`crate::read::Reader`]). Several nodes can run in one process (tests), each with its
//! own address and store directory. The node does not decide placement or keep block
//! metadata: the embedding server does, fed by [`NodeEvent`]s.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use crate::block::{BlockId, GenStamp};
use crate::pipeline::PipelineConfig;
use crate::store::{BlockStore, OpenReport, StoreConfig, StoreError};
use crate::topology::{NodeId, Tier, Topology};
use crate::transport::{Incoming, Stream, TlsIdentity, Transport, TransportConfig, TransportError};
use crate::wire::{ErrorFrame, Frame, Status};

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's name in the topology.
    pub name: String,
    /// The cluster topology.
    pub topology: Arc<Topology>,
    /// TLS identity (cluster CA, node certificate and key).
    pub identity: TlsIdentity,
    /// Block store settings.
    pub store: StoreConfig,
    /// Link settings.
    pub transport: TransportConfig,
    /// Write pipeline settings.
    pub pipeline: PipelineConfig,
    /// How long [`Node::shutdown`] waits for in-flight work before aborting it.
    pub shutdown_grace: Duration,
    /// DCI protection settings.
    pub dci: DciConfig,
    /// Async replication (the durable log and its workers); `None` disables async writes
    /// from this node.
    pub replication: Option<crate::replication::ReplicationConfig>,
}

/// This node's use of the DCI links.
#[derive(Debug, Clone)]
pub struct DciConfig {
    /// Fraction (0..=1) of each DCI link's budget this node may use. Nodes of an IDC that
    /// all send across should split the budget (e.g. 1/4 each for four senders).
    pub share: f64,
    /// Compress packets on DCI hops when the link is the bottleneck and data compresses.
    pub compress: bool,
    /// Per class (`sync`, `read`, `async`, `repair`): guaranteed rate and ceiling in
    /// percent of this node's share; `None` keeps the default split (40/20/20/10, every
    /// ceiling 100).
    pub classes: Option<[(u8, u8); 4]>,
}

impl Default for DciConfig {
    fn default() -> Self {
        DciConfig {
            share: 1.0,
            compress: true,
            classes: None,
        }
    }
}

impl NodeConfig {
    /// Defaults for node `name` with its store at `store_root`.
    pub fn new(
        name: impl Into<String>,
        topology: Arc<Topology>,
        identity: TlsIdentity,
        store_root: impl Into<std::path::PathBuf>,
    ) -> Self {
        NodeConfig {
            name: name.into(),
            topology,
            identity,
            store: StoreConfig::new(store_root),
            transport: TransportConfig::default(),
            pipeline: PipelineConfig::default(),
            shutdown_grace: Duration::from_secs(5),
            dci: DciConfig::default(),
            replication: None,
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The name is not a node of the topology.
    #[error("node {0:?} is not in the topology")]
    UnknownNode(String),
    /// The store could not be opened.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The transport could not start.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The DCI governor settings are invalid.
    #[error("dci governor: {0}")]
    Dci(#[from] crate::dci::GovernorError),
    /// The replication log could not be opened.
    #[error("replication log: {0}")]
    Replication(#[from] crate::replication::ReplicationError),
}

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

/// Byte counters by distance tier (index: [`Tier`] as usize).
#[derive(Debug, Default)]
pub struct TierCounters([AtomicU64; 4]);

impl TierCounters {
    /// Adds `n` bytes at `tier`.
    pub fn add(&self, tier: Tier, n: u64) {
        self.0[tier as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes counted at `tier`.
    pub fn get(&self, tier: Tier) -> u64 {
        self.0[tier as usize].load(Ordering::Relaxed)
    }
}

/// Counters of a node.
#[derive(Debug, Default)]
pub struct NodeMetrics {
    /// Block bytes this node's clients read, by the tier of the replica they came from
    /// (as they crossed the network: compressed size for compressed packets).
    pub read_bytes: TierCounters,
    /// Block bytes this node served to readers, by the tier of the reader.
    pub served_bytes: TierCounters,
    /// Packet payload bytes this node sent down write pipelines, by tier of the hop.
    pub pipeline_sent_bytes: TierCounters,
    /// Packet payload bytes this node received from upstream in write pipelines, as they
    /// came off the wire (compressed or not), by tier of the hop.
    pub pipeline_received_bytes: TierCounters,
    /// Bytes this node sent across the DCI as they went on the wire (after compression).
    pub dci_wire_bytes: AtomicU64,
    /// Bytes compression saved on DCI hops.
    pub dci_saved_bytes: AtomicU64,
    /// Latency of packet acks seen by writers on this node, µs.
    pub pipeline_ack_us: LatencyHistogram,
    /// Latency of reads by readers on this node, µs.
    pub read_us: LatencyHistogram,
    /// Block bytes exchanged with each peer: (received, sent).
    pub peers: PeerCounters,
}

/// Block bytes received from and sent to each peer.
#[derive(Debug, Default)]
pub struct PeerCounters(std::sync::Mutex<HashMap<NodeId, (u64, u64)>>);

impl PeerCounters {
    /// Counts `n` bytes received from `peer`.
    pub fn received(&self, peer: NodeId, n: u64) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(peer)
            .or_default()
            .0 += n;
    }

    /// Counts `n` bytes sent to `peer`.
    pub fn sent(&self, peer: NodeId, n: u64) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(peer)
            .or_default()
            .1 += n;
    }

    /// (received, sent) per peer.
    pub fn snapshot(&self) -> Vec<(NodeId, u64, u64)> {
        let mut v: Vec<_> = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(&p, &(r, s))| (p, r, s))
            .collect();
        v.sort();
        v
    }
}

/// A shared latency histogram in microseconds (1 µs to 10 min).
#[derive(Debug)]
pub struct LatencyHistogram(std::sync::Mutex<hdrhistogram::Histogram<u64>>);

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram(std::sync::Mutex::new(
            hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 3)
                .expect("valid histogram bounds"),
        ))
    }
}

impl LatencyHistogram {
    /// Records one latency.
    pub fn record(&self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 600_000_000);
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(us);
    }

    /// A copy of the histogram.
    pub fn snapshot(&self) -> hdrhistogram::Histogram<u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Relays of the blocks being written through this node, so that a recovery pipeline
/// waits for the old relay of the same block to finish before touching the replica.
pub(crate) type RelayRegistry = std::sync::Mutex<HashMap<BlockId, watch::Receiver<bool>>>;

pub(crate) struct Shared {
    pub(crate) me: NodeId,
    pub(crate) topology: Arc<Topology>,
    pub(crate) store: BlockStore,
    pub(crate) transport: Transport,
    pub(crate) pipeline: PipelineConfig,
    pub(crate) events: broadcast::Sender<NodeEvent>,
    pub(crate) metrics: NodeMetrics,
    pub(crate) relays: RelayRegistry,
    pub(crate) governors: crate::dci::DciGovernors,
    pub(crate) compress: Option<crate::dci::compress::CompressPolicy>,
    pub(crate) replicator: Option<Arc<crate::replication::Replicator>>,
    /// Streams being served.
    pub(crate) handlers: AtomicU64,
}

impl Shared {
    pub(crate) fn emit(&self, e: NodeEvent) {
        // No subscriber is fine: events are advisory.
        let _ = self.events.send(e);
    }

    pub(crate) fn name(&self, n: NodeId) -> &str {
        &self.topology.node(n).name
    }

    /// The governor of the DCI link to `peer`, when talking to it crosses the DCI.
    pub(crate) fn governor_to(&self, peer: NodeId) -> Option<&crate::dci::DciGovernor> {
        let (a, b) = (
            self.topology.location(self.me).idc,
            self.topology.location(peer).idc,
        );
        if a == b { None } else { self.governors.to(b) }
    }

    /// Prepares a packet for a DCI hop: compresses it when the receiver accepts that
    /// (`compression`) and it pays, waits for the governor to admit its bytes, and counts
    /// them. Intra-IDC packets pass untouched.
    pub(crate) async fn govern_packet(
        &self,
        peer: NodeId,
        class: crate::wire::TrafficClass,
        compression: crate::wire::Compression,
        p: crate::wire::Packet,
    ) -> crate::wire::Packet {
        let Some(gov) = self.governor_to(peer) else {
            return p;
        };
        let raw = p.payload.len() as u64;
        let p = match (&self.compress, compression) {
            (Some(policy), crate::wire::Compression::Zstd) => policy.apply(p, gov.backlogged()),
            _ => p,
        };
        let wire = p.payload.len() as u64;
        // Charge what actually crosses: payload plus frame header and checksums.
        gov.acquire(class, wire + 32 + 4 * p.crcs.len() as u64)
            .await;
        self.metrics
            .dci_wire_bytes
            .fetch_add(wire, Ordering::Relaxed);
        self.metrics
            .dci_saved_bytes
            .fetch_add(raw - wire, Ordering::Relaxed);
        p
    }
}

/// What a node holds open: the figures that must return to their baseline once the
/// node is idle, whatever it has written and read before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct NodeResources {
    /// Pipeline relays registered (one per block being written through this node).
    pub relays: usize,
    /// Replica files open in the store (two per open writer or reader).
    pub open_replicas: usize,
    /// Streams from peers being served.
    pub handlers: usize,
    /// QUIC connections of the transport (both directions).
    pub quic_connections: usize,
}

/// A running storage node. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    pub(crate) shared: Arc<Shared>,
    tasks: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    replication_task: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    grace: Duration,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.shared.name(self.shared.me))
            .finish()
    }
}

impl Node {
    /// Opens the store, binds the transport and starts serving peers.
    pub async fn start(config: NodeConfig) -> Result<(Node, OpenReport), NodeError> {
        let me = config
            .topology
            .node_by_name(&config.name)
            .ok_or_else(|| NodeError::UnknownNode(config.name.clone()))?;
        let (store, report) = BlockStore::open(config.store.clone()).await?;
        let (transport, incoming) = Transport::bind(
            me,
            config.topology.clone(),
            &config.identity,
            config.transport.clone(),
        )
        .await?;
        let (events, _) = broadcast::channel(1024);
        let replicator = match &config.replication {
            Some(rc) => Some(crate::replication::Replicator::open(rc.clone())?.0),
            None => None,
        };
        let governors = crate::dci::DciGovernors::for_node_with(
            &config.topology,
            config.topology.location(me).idc,
            config.dci.share,
            config.dci.classes,
        )?;
        let shared = Arc::new(Shared {
            replicator: replicator.clone(),
            governors,
            compress: config
                .dci
                .compress
                .then(crate::dci::compress::CompressPolicy::default),
            me,
            topology: config.topology.clone(),
            store,
            transport,
            pipeline: config.pipeline.clone(),
            events,
            metrics: NodeMetrics::default(),
            relays: std::sync::Mutex::new(HashMap::new()),
            handlers: AtomicU64::new(0),
        });
        let task = tokio::spawn(serve(shared.clone(), incoming));
        let node = Node {
            shared,
            tasks: Arc::new(std::sync::Mutex::new(Some(task))),
            replication_task: Arc::new(std::sync::Mutex::new(None)),
            grace: config.shutdown_grace,
        };
        if let Some(rep) = replicator {
            // The log's pending tasks (after a restart, those not yet done) start now.
            let t = crate::replication::start(node.clone(), rep);
            *node
                .replication_task
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(t);
        }
        Ok((node, report))
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.shared.me
    }

    /// The topology.
    pub fn topology(&self) -> &Arc<Topology> {
        &self.shared.topology
    }

    /// The block store.
    pub fn store(&self) -> &BlockStore {
        &self.shared.store
    }

    /// The transport.
    pub fn transport(&self) -> &Transport {
        &self.shared.transport
    }

    /// Counters.
    pub fn metrics(&self) -> &NodeMetrics {
        &self.shared.metrics
    }

    /// What this node holds open now (for leak checks and metrics).
    pub fn resources(&self) -> NodeResources {
        NodeResources {
            relays: self
                .shared
                .relays
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .len(),
            open_replicas: self.shared.store.open_files(),
            handlers: self.shared.handlers.load(Ordering::Relaxed) as usize,
            quic_connections: self.shared.transport.open_quic_connections(),
        }
    }

    /// This node's DCI governors, by remote IDC.
    pub fn governors(&self) -> &crate::dci::DciGovernors {
        &self.shared.governors
    }

    /// Subscribes to events (under-replicated blocks, corrupt replicas). Events sent while
    /// nobody listens, or that a slow listener misses beyond 1024, are dropped.
    pub fn events(&self) -> broadcast::Receiver<NodeEvent> {
        self.shared.events.subscribe()
    }

    /// Stops serving: closes the transport (in-flight pipelines through this node fail and
    /// leave their replicas in `rbw`, recoverable), waits up to the grace period for the
    /// handlers to finish, then aborts the rest.
    pub async fn shutdown(&self) {
        // Replication workers stop; their tasks stay in the log for the next start.
        let replication = self
            .replication_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = replication {
            t.abort();
            let _ = t.await;
        }
        let task = self.tasks.lock().unwrap_or_else(|e| e.into_inner()).take();
        self.shared.transport.shutdown().await;
        if let Some(t) = task {
            let abort = t.abort_handle();
            if tokio::time::timeout(self.grace, t).await.is_err() {
                abort.abort();
            }
        }
    }
}

async fn serve(shared: Arc<Shared>, mut incoming: Incoming) {
    let mut handlers = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            s = incoming.accept() => match s {
                Some(s) => {
                    handlers.spawn(handle(shared.clone(), s));
                }
                None => break,
            },
            Some(_) = handlers.join_next(), if !handlers.is_empty() => {}
        }
    }
    while handlers.join_next().await.is_some() {}
}

/// [`handle`] behind a boxed, `Send` future: the in-process first hop spawns it from
/// inside the pipeline, which `handle` itself reaches, and the box breaks that cycle
/// for the compiler.
pub(crate) fn handle_boxed(
    shared: Arc<Shared>,
    s: Stream,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(handle(shared, s))
}

/// Counts a stream being served for as long as it lives.
struct HandlerGuard(Arc<Shared>);

impl Drop for HandlerGuard {
    fn drop(&mut self) {
        self.0.handlers.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) async fn handle(shared: Arc<Shared>, mut s: Stream) {
    shared.handlers.fetch_add(1, Ordering::Relaxed);
    let _guard = HandlerGuard(shared.clone());
    let first = match s.reader.recv().await {
        Ok(Some(f)) => f,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(peer = %shared.name(s.peer), error = %e, "bad first frame");
            return;
        }
    };
    match first {
        Frame::WriteBlock(req) => crate::pipeline::serve_write(shared, s, req).await,
        Frame::ReadBlock(req) => crate::read::serve_read(shared, s, req).await,
        Frame::Replicate(req) => crate::pipeline::serve_replicate(shared, s, req).await,
        other => {
            let msg = format!(
                "unexpected first frame {:?}",
                std::mem::discriminant(&other)
            );
            let _ = s
                .writer
                .send(&Frame::Error(ErrorFrame {
                    status: Status::Rejected,
                    message: msg,
                }))
                .await;
        }
    }
}
