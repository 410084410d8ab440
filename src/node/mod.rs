//! The storage server a process embeds: its block store, its transport, the relay side of
//! write pipelines, the read service and async replication.
//!
//! [`Node::start`] opens the store, binds the transport, builds the services and serves
//! every stream peers open (see `dispatch.rs`): a `WriteBlock` or `CopyBlock` frame goes
//! to the pipeline service, a `ReadBlock` to the read service. The node is also the handle
//! a local client writes and reads through: [`Node::writer`] and [`Node::reader`] hand out
//! a [`Writer`] and a [`Reader`] over the services, which never see the `Node` itself.
//! Several nodes can run in one process (tests), each with its own address and store
//! directory. The node does not decide placement or keep block metadata: the embedding
//! server does, fed by [`NodeEvent`]s.

mod dispatch;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;

pub use crate::context::NodeEvent;

use crate::bandwidth::{Bandwidth, LinkShare};
use crate::block::{BlockId, GenStamp};
use crate::context::NodeContext;
use crate::dci::{DciGovernors, Egress};
use crate::metrics::NodeMetrics;
use crate::pipeline::{PipelineConfig, Pipelines, WriteError, WriteParams, Writer};
use crate::read::{ReadParams, Reader};
use crate::repair::{RepairConfig, RepairError, RepairReport, RepairStatus, Repairs};
use crate::replication::{ReplicationError, ReplicationQueue, RpoStatus};
use crate::store::{BlockStore, OpenReport, ReplicaInfo, StoreConfig, StoreError};
use crate::topology::{NodeId, Topology, TopologyError};
use crate::transfer::Transfers;
use crate::transport::{TlsIdentity, Transport, TransportConfig, TransportError};
use crate::wire::TrafficClass;

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
    pub dci: crate::dci::DciConfig,
    /// Async replication (the durable log and its workers); `None` disables async writes
    /// from this node.
    pub replication: Option<crate::replication::ReplicationConfig>,
    /// Repair (the durable queue, the peer watcher); `None`: this node neither notices
    /// lost replicas nor repairs them.
    pub repair: Option<RepairConfig>,
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
            dci: crate::dci::DciConfig::default(),
            replication: None,
            repair: None,
        }
    }
}

/// What a topology reload ([`Node::set_topology`]) changed, by node name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct TopologyChange {
    /// Nodes that joined (or came back).
    pub added: Vec<String>,
    /// Nodes that left.
    pub removed: Vec<String>,
    /// Nodes still there whose address, capacity, rack or tenant changed.
    pub changed: Vec<String>,
}

impl TopologyChange {
    fn between(old: &Topology, new: &Topology) -> Self {
        let mut c = TopologyChange::default();
        for (i, n) in new.nodes().iter().enumerate() {
            let id = n.location.node;
            debug_assert_eq!(id.index(), i);
            let (was_in, is_in) = (old.contains(id), new.contains(id));
            let name = n.name.clone();
            match (was_in, is_in) {
                (false, true) => c.added.push(name),
                (true, false) => c.removed.push(name),
                (true, true) => {
                    let o = old.node(id);
                    if (o.addr, o.dci_addr, o.capacity, o.location.rack, &o.tenant)
                        != (n.addr, n.dci_addr, n.capacity, n.location.rack, &n.tenant)
                    {
                        c.changed.push(name);
                    }
                }
                (false, false) => {}
            }
        }
        c
    }

    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
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
    /// The repair queue could not be opened.
    #[error("repair queue: {0}")]
    Repair(crate::replication::ReplicationError),
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
    /// Write slots held (gang admission; one per pipeline through this node).
    pub write_slots: usize,
    /// DCI slots held (one per sync pipeline this node forwards across the DCI).
    pub dci_slots: usize,
}

type TaskSlot = Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>;

/// A running storage node. Cheap to clone: clones are handles on the same node.
#[derive(Clone)]
pub struct Node {
    ctx: Arc<NodeContext>,
    pipelines: Arc<Pipelines>,
    queue: Option<Arc<ReplicationQueue>>,
    /// Streams from peers being served.
    handlers: Arc<AtomicU64>,
    serve_task: TaskSlot,
    replication_task: TaskSlot,
    bandwidth: Option<Arc<Bandwidth>>,
    /// Share members, and the repair service's dispatcher, watcher and listener.
    bandwidth_tasks: Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    repairs: Option<Arc<Repairs>>,
    grace: Duration,
    /// Held while a topology reload is applied: two at once would each revise the same
    /// old topology and the second would undo the first.
    reloading: Arc<std::sync::Mutex<()>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.ctx.name(self.ctx.me))
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
        let queue = match &config.replication {
            Some(rc) => Some(ReplicationQueue::open(rc.clone())?),
            None => None,
        };
        let ctx = Arc::new(NodeContext {
            me,
            dci: Egress::new(transport.live_topology().clone(), me, &config.dci)?,
            store,
            transport,
            metrics: NodeMetrics::default(),
            events,
            siblings: Default::default(),
        });
        let pipelines = Pipelines::new(ctx.clone(), config.pipeline.clone(), queue.clone());
        let (bandwidth, mut bandwidth_tasks) = match &config.dci.shares {
            Some(settings) => {
                let (svc, tasks) = Bandwidth::start(ctx.clone(), settings.clone());
                (Some(svc), tasks)
            }
            None => (None, Vec::new()),
        };
        let repairs = match &config.repair {
            Some(rc) => {
                let (svc, tasks) = Repairs::start(ctx.clone(), pipelines.clone(), rc.clone())
                    .map_err(NodeError::Repair)?;
                bandwidth_tasks.extend(tasks);
                Some(svc)
            }
            None => None,
        };
        let handlers = Arc::new(AtomicU64::new(0));
        let serve_task = tokio::spawn(dispatch::serve(
            dispatch::Services {
                ctx: ctx.clone(),
                pipelines: pipelines.clone(),
                bandwidth: bandwidth.clone(),
                handlers: handlers.clone(),
                repairs: repairs.clone(),
            },
            incoming,
        ));
        let replication_task = queue.clone().map(|q| {
            // The log's pending tasks (after a restart, those not yet done) start now.
            crate::replication::start(
                q,
                Transfers::new(ctx.clone(), pipelines.clone(), TrafficClass::Async),
            )
        });
        let node = Node {
            ctx,
            pipelines,
            queue,
            handlers,
            serve_task: Arc::new(std::sync::Mutex::new(Some(serve_task))),
            replication_task: Arc::new(std::sync::Mutex::new(replication_task)),
            bandwidth,
            bandwidth_tasks: Arc::new(std::sync::Mutex::new(bandwidth_tasks)),
            repairs,
            grace: config.shutdown_grace,
            reloading: Default::default(),
        };
        Ok((node, report))
    }

    /// Sets up a pipeline through `targets` (in pipeline order, e.g. from
    /// [`placement`](crate::placement)) for a new block written from this node. See
    /// [`pipeline`](crate::pipeline).
    pub async fn writer(
        &self,
        block: BlockId,
        targets: &[NodeId],
        params: WriteParams,
    ) -> Result<Writer, WriteError> {
        Writer::create(&self.pipelines, block, targets, params).await
    }

    /// Prepares reads of `block` at `genstamp` from `replicas`, nearest first. See
    /// [`read`](crate::read).
    pub fn reader(
        &self,
        block: BlockId,
        genstamp: GenStamp,
        replicas: &[NodeId],
        params: ReadParams,
    ) -> Reader {
        Reader::open(self.ctx.clone(), block, genstamp, replicas, params)
    }

    /// RPO figures of this node's replication log.
    pub fn rpo(&self) -> Result<RpoStatus, ReplicationError> {
        self.queue
            .as_ref()
            .map(|q| q.status(SystemTime::now()))
            .ok_or(ReplicationError::NotConfigured)
    }

    /// Replication tasks this node dropped without copying them (their block moved to a
    /// newer generation stamp or is gone).
    pub fn replication_dropped(&self) -> u64 {
        self.queue.as_ref().map_or(0, |q| q.dropped())
    }

    /// Every replica this node holds: block, genstamp, length and state (`rbw`,
    /// finalized, corrupt), in block order — what a metadata service reconciles against.
    pub fn block_report(&self) -> Vec<ReplicaInfo> {
        self.ctx.store.list()
    }

    /// Repairs `block` now: probes `replicas` (the set it should have, at `genstamp` and
    /// `len`), and copies it, class `repair`, from the nearest holder to a replacement in
    /// the IDC of each member that does not hold it — same IDC first, across the DCI only
    /// when the IDC has no holder (an operator's repair does not wait out the grace
    /// period). Idempotent; two at once end with one set of copies. Needs
    /// `NodeConfig::repair`.
    pub async fn repair(
        &self,
        block: BlockId,
        genstamp: GenStamp,
        len: u64,
        replicas: &[NodeId],
    ) -> Result<RepairReport, RepairError> {
        let svc = self.repairs.as_ref().ok_or(RepairError::NotConfigured)?;
        svc.repair_now(block, genstamp, len, replicas).await
    }

    /// Queues a repair of `block` (durably): `replicas` is the set it should have, `lost`
    /// the members known lost. The queue runs it with the node's own repairs.
    pub async fn request_repair(
        &self,
        block: BlockId,
        genstamp: GenStamp,
        len: u64,
        replicas: &[NodeId],
        lost: &[NodeId],
    ) -> Result<(), RepairError> {
        let svc = self.repairs.as_ref().ok_or(RepairError::NotConfigured)?;
        Ok(svc.enqueue(block, genstamp, len, replicas, lost).await?)
    }

    /// The repair queue's figures; `None` without `NodeConfig::repair`.
    pub fn repair_status(&self) -> Option<RepairStatus> {
        self.repairs.as_ref().map(|r| r.status())
    }

    /// What this node knows of every node, for placement
    /// ([`placement::choose_targets`](crate::placement::choose_targets)): the nodes its
    /// peer watch counts as down (with `NodeConfig::repair`), the ones its transport
    /// failed to reach twice in a row ([`Transport::unreachable_peers`]) and the ones
    /// a reload removed are not alive, and its own
    /// free bytes are what its store's filesystem has left (at most its capacity). Other
    /// nodes' free space is not known here: their capacity stands for it.
    pub fn node_states(&self) -> crate::placement::NodeStates {
        let topo = self.ctx.topology();
        let mut states = crate::placement::NodeStates::from_topology(&topo);
        let down = self.repair_status().map(|r| r.down).unwrap_or_default();
        for down in down
            .into_iter()
            .chain(self.ctx.transport.unreachable_peers())
        {
            let mut s = *states.get(down);
            s.alive = false;
            states.set(down, s);
        }
        if let Some(free) = self.ctx.store.free_bytes() {
            let me = self.ctx.me;
            let mut s = *states.get(me);
            s.free_bytes = s.free_bytes.min(free);
            states.set(me, s);
        }
        states
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.ctx.me
    }

    /// The topology in force (a snapshot: a reload replaces it, see
    /// [`set_topology`](Self::set_topology)).
    pub fn topology(&self) -> Arc<Topology> {
        self.ctx.topology()
    }

    /// Applies a changed topology without a restart (what the daemon does on SIGHUP
    /// after reading its topology file again): `next` is merged into the topology in
    /// force with [`Topology::revise`], so every [`NodeId`] keeps naming the same node.
    /// From then on new nodes are accepted as peers (their certificates name them) and
    /// placed on; removed nodes are refused (streams from them, and new streams to them)
    /// and never placed on (they are not alive in [`node_states`](Self::node_states)),
    /// and with the repair service their replicas are repaired as a dead node's are;
    /// connections to removed nodes and to nodes whose address changed are closed; DCI
    /// governors take the new link budgets (with cluster-wide shares, from the next
    /// report on: a lower budget is in force within one lease).
    ///
    /// Refused, with the topology in force unchanged: what [`Topology::revise`] refuses,
    /// and a topology that removes this node or changes its address (its sockets are
    /// bound to it: restart it instead).
    pub fn set_topology(&self, next: &Topology) -> Result<TopologyChange, TopologyError> {
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.ctx.topology();
        let revised = old.revise(next)?;
        let me = self.ctx.me;
        if !revised.contains(me) {
            return Err(TopologyError::Reload {
                reason: format!("this node ({}) is not in it", old.node(me).name),
            });
        }
        let (was, now) = (old.node(me), revised.node(me));
        if (was.addr, was.dci_addr) != (now.addr, now.dci_addr) {
            return Err(TopologyError::Reload {
                reason: format!(
                    "this node's address changes from {} to {} (restart it instead)",
                    was.addr, now.addr
                ),
            });
        }
        let change = TopologyChange::between(&old, &revised);
        let revised = Arc::new(revised);
        self.ctx.transport.set_topology(revised.clone());
        if let Err(e) = self.ctx.dci.retune(&revised) {
            tracing::warn!(error = %e, "cannot apply the new DCI budgets");
        }
        tracing::info!(added = ?change.added, removed = ?change.removed, changed = ?change.changed, "topology reloaded");
        Ok(change)
    }

    /// The block store.
    pub fn store(&self) -> &BlockStore {
        &self.ctx.store
    }

    /// The transport.
    pub fn transport(&self) -> &Transport {
        &self.ctx.transport
    }

    /// Counters.
    pub fn metrics(&self) -> &NodeMetrics {
        &self.ctx.metrics
    }

    /// This node's DCI governors, by remote IDC.
    pub fn governors(&self) -> &DciGovernors {
        self.ctx.dci.governors()
    }

    /// This node's part of the cluster-wide share of its DCI link to `idc` (rate, floor,
    /// lease, demand, allocator); `None` without `DciConfig::shares` or before the first
    /// report.
    pub fn dci_share(&self, idc: crate::topology::IdcId) -> Option<LinkShare> {
        self.bandwidth.as_ref().and_then(|b| b.link(idc))
    }

    /// What this node holds open now (for leak checks and metrics).
    pub fn resources(&self) -> NodeResources {
        NodeResources {
            relays: self.pipelines.relay_count(),
            open_replicas: self.ctx.store.open_files(),
            handlers: self.handlers.load(Ordering::Relaxed) as usize,
            quic_connections: self.ctx.transport.open_quic_connections(),
            write_slots: self.pipelines.slots_used(),
            dci_slots: self.pipelines.dci_slots_used(),
        }
    }

    /// Subscribes to events (under-replicated blocks, corrupt replicas). Events sent while
    /// nobody listens, or that a slow listener misses beyond 1024, are dropped.
    pub fn events(&self) -> broadcast::Receiver<NodeEvent> {
        self.ctx.events.subscribe()
    }

    /// Stops serving: closes the transport (in-flight pipelines through this node fail and
    /// leave their replicas in `rbw`, recoverable), waits up to the grace period for the
    /// handlers to finish, then aborts the rest.
    pub async fn shutdown(&self) {
        // The replica sets recorded so far are made durable first (bounded by the grace).
        let _ = tokio::time::timeout(self.grace, self.ctx.siblings.flush()).await;
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
        // Share reports and repairs stop (queued repairs stay in their log); this node's
        // grants lapse with their leases.
        let members: Vec<_> = std::mem::take(
            &mut *self
                .bandwidth_tasks
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        );
        for t in members {
            t.abort();
            let _ = t.await;
        }
        let task = self
            .serve_task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        self.ctx.transport.shutdown().await;
        if let Some(t) = task {
            let abort = t.abort_handle();
            if tokio::time::timeout(self.grace, t).await.is_err() {
                abort.abort();
            }
        }
    }
}
