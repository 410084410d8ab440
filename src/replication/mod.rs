//! Async replication: a block written in async mode is acknowledged once the replicas in
//! the writer's IDC have it and its task is durable in the [`ReplicationLog`]; workers
//! then copy it to the remote IDC — **one** copy across the DCI, through the governor's
//! `async` class, to the first remote target, which relays it to the next inside its IDC.
//!
//! Tasks are taken in log order with bounded concurrency. A task is idempotent: remote
//! targets that already hold the block finalized at its genstamp are skipped, and a task
//! whose genstamp is older than the block's current one is dropped as stale. Failures are
//! retried with capped exponential backoff and jitter, so a remote IDC that is down pauses
//! the workers without spinning and without losing tasks. The RPO (bytes and age of data
//! acknowledged but not yet remote) is tracked, and an [`RpoPolicy`] applies when it
//! passes its bound.

mod log;
pub mod record;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::{RngExt, SeedableRng};
use tokio::sync::{Notify, Semaphore};

pub use log::ReplicationLog;
pub use record::Task;

use crate::block::{BlockId, GenStamp};
use crate::node::{Node, Shared};
use crate::pipeline::{WriteParams, Writer};
use crate::read::{ReadParams, Reader};
use crate::topology::NodeId;
use crate::wire::{Compression, Frame, ReadBlock, Status, TrafficClass};

/// Errors of the replication log and workers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicationError {
    /// A log file could not be read or written.
    #[error("replication log {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A log segment other than the last is damaged.
    #[error("replication log segment {path} is damaged at offset {offset}")]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Where the valid prefix ends.
        offset: u64,
    },
    /// The log is shut down.
    #[error("replication log is closed")]
    Closed,
    /// This node has no replication log configured.
    #[error("this node has no replication log (NodeConfig::replication)")]
    NotConfigured,
}

/// What to do when the RPO passes its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RpoPolicy {
    /// New async writes wait until the backlog is back under the bound.
    Block,
    /// New writes fall back to sync mode.
    Sync,
    /// Only log a warning.
    Warn,
}

/// Settings of async replication on a node.
#[derive(Debug, Clone)]
pub struct ReplicationConfig {
    /// Directory of the log (not inside the block store).
    pub log_dir: PathBuf,
    /// Size at which a log segment rolls.
    pub segment_bytes: u64,
    /// Tasks copied concurrently.
    pub workers: usize,
    /// RPO bound in bytes not yet remote (`None`: no bound).
    pub max_lag_bytes: Option<u64>,
    /// RPO bound in age of the oldest task (`None`: no bound).
    pub max_lag_age: Option<Duration>,
    /// What happens past the bound.
    pub policy: RpoPolicy,
    /// First retry delay.
    pub backoff_min: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
}

impl ReplicationConfig {
    /// Defaults with the log in `log_dir`.
    pub fn new(log_dir: impl Into<PathBuf>) -> Self {
        ReplicationConfig {
            log_dir: log_dir.into(),
            segment_bytes: 64 << 20,
            workers: 2,
            max_lag_bytes: None,
            max_lag_age: None,
            policy: RpoPolicy::Warn,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// What the RPO guard says about a new async write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go ahead in async mode.
    Async,
    /// Write it in sync mode instead.
    Sync,
}

/// RPO figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RpoStatus {
    /// Tasks not yet done.
    pub pending_tasks: usize,
    /// Bytes of those tasks.
    pub pending_bytes: u64,
    /// Age of the oldest pending task.
    pub oldest_age: Duration,
    /// Bytes copied to the remote IDC so far.
    pub drained_bytes: u64,
}

pub(crate) struct Replicator {
    log: ReplicationLog,
    config: ReplicationConfig,
    drained: AtomicU64,
    wake: Notify,
    progress: Notify,
    queued: Mutex<std::collections::BTreeSet<u64>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Replicator {
    pub(crate) fn open(
        config: ReplicationConfig,
    ) -> Result<(Arc<Replicator>, Vec<Task>), ReplicationError> {
        let (log, pending) = ReplicationLog::open(&config.log_dir, config.segment_bytes)?;
        Ok((
            Arc::new(Replicator {
                log,
                config,
                drained: AtomicU64::new(0),
                wake: Notify::new(),
                progress: Notify::new(),
                queued: Mutex::new(Default::default()),
            }),
            pending,
        ))
    }

    pub(crate) fn status(&self) -> RpoStatus {
        let pending = self.log.pending();
        let oldest = pending.iter().map(|t| t.created_ms).min();
        RpoStatus {
            pending_tasks: pending.len(),
            pending_bytes: pending.iter().map(|t| t.len).sum(),
            oldest_age: oldest.map_or(Duration::ZERO, |c| {
                Duration::from_millis(now_ms().saturating_sub(c))
            }),
            drained_bytes: self.drained.load(Ordering::Relaxed),
        }
    }

    fn over_bound(&self) -> bool {
        let s = self.status();
        self.config
            .max_lag_bytes
            .is_some_and(|b| s.pending_bytes > b)
            || self.config.max_lag_age.is_some_and(|a| s.oldest_age > a)
    }

    /// Applies the RPO policy to a new async write.
    pub(crate) async fn admit(&self) -> Admission {
        if !self.over_bound() {
            return Admission::Async;
        }
        match self.config.policy {
            RpoPolicy::Warn => {
                tracing::warn!(status = ?self.status(), "RPO bound exceeded");
                Admission::Async
            }
            RpoPolicy::Sync => Admission::Sync,
            RpoPolicy::Block => {
                while self.over_bound() {
                    let progressed = self.progress.notified();
                    // Re-check at least every second, in case the clock alone moves the age.
                    let _ = tokio::time::timeout(Duration::from_secs(1), progressed).await;
                }
                Admission::Async
            }
        }
    }

    pub(crate) async fn append(&self, mut task: Task) -> Result<Task, ReplicationError> {
        task.created_ms = now_ms();
        let t = self.log.append(task).await?;
        self.wake.notify_one();
        Ok(t)
    }
}

/// Starts the dispatcher that hands pending tasks, in order, to at most `workers`
/// concurrent copies.
pub(crate) fn start(node: Node, rep: Arc<Replicator>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(rep.config.workers.max(1)));
        let mut workers = tokio::task::JoinSet::new();
        loop {
            while workers.try_join_next().is_some() {}
            let woken = rep.wake.notified();
            for task in rep.log.pending() {
                if !rep
                    .queued
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(task.seq)
                {
                    continue;
                }
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (node, rep) = (node.clone(), rep.clone());
                workers.spawn(async move {
                    run_task(&node, &rep, task).await;
                    drop(permit);
                });
            }
            woken.await;
        }
    })
}

async fn run_task(node: &Node, rep: &Replicator, task: Task) {
    let mut delay = rep.config.backoff_min;
    let mut rng = rand::rngs::StdRng::seed_from_u64(task.seq ^ 0x5eed);
    loop {
        match copy_once(node, &task).await {
            Ok(copied) => {
                rep.drained.fetch_add(copied, Ordering::Relaxed);
                break;
            }
            Err(Outcome::Stale(why)) => {
                tracing::info!(block = %task.block, genstamp = %task.genstamp, reason = why, "dropping stale replication task");
                break;
            }
            Err(Outcome::Retry(why)) => {
                tracing::debug!(block = %task.block, reason = why, ?delay, "replication attempt failed, backing off");
                // Capped exponential backoff with ±25% jitter: a down IDC pauses the worker.
                let jitter = rng.random_range(0.75..1.25);
                tokio::time::sleep(delay.mul_f64(jitter)).await;
                delay = (delay * 2).min(rep.config.backoff_max);
            }
        }
    }
    if let Err(e) = rep.log.complete(task.seq).await {
        tracing::error!(seq = task.seq, error = %e, "cannot record a finished replication task");
    }
    rep.queued
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&task.seq);
    rep.progress.notify_waiters();
}

enum Outcome {
    Stale(String),
    Retry(String),
}

/// Whether `peer` holds `block` finalized at `gs` with `len` bytes.
async fn has_replica(
    shared: &Shared,
    peer: NodeId,
    block: BlockId,
    gs: GenStamp,
    len: u64,
) -> Result<bool, String> {
    if peer == shared.me {
        return Ok(shared.store.get(block).is_some_and(|r| {
            r.genstamp == gs && r.len == len && r.state == crate::store::ReplicaState::Finalized
        }));
    }
    let mut s = shared
        .transport
        .open(peer)
        .await
        .map_err(|e| e.to_string())?;
    let probe = Frame::ReadBlock(ReadBlock {
        block,
        genstamp: gs,
        offset: 0,
        len: 0,
        class: TrafficClass::Async,
        compression: Compression::None,
    });
    s.writer.send(&probe).await.map_err(|e| e.to_string())?;
    match s.reader.recv().await.map_err(|e| e.to_string())? {
        Some(Frame::ReadResponse(r)) => Ok(r.status == Status::Success && r.replica_len == len),
        _ => Ok(false),
    }
}

/// One attempt at a task; returns the bytes copied across.
async fn copy_once(node: &Node, task: &Task) -> Result<u64, Outcome> {
    let shared = &node.shared;
    let topo = &shared.topology;
    let ids = |names: &[String]| -> Vec<NodeId> {
        names.iter().filter_map(|n| topo.node_by_name(n)).collect()
    };
    let (sources, targets) = (ids(&task.sources), ids(&task.targets));
    if let Some(r) = shared.store.get(task.block)
        && r.genstamp > task.genstamp
    {
        return Err(Outcome::Stale(format!(
            "local replica is at {}",
            r.genstamp
        )));
    }
    let mut missing = Vec::new();
    for &t in &targets {
        match has_replica(shared, t, task.block, task.genstamp, task.len).await {
            Ok(true) => {}
            Ok(false) => missing.push(t),
            Err(e) => return Err(Outcome::Retry(format!("probe {}: {e}", shared.name(t)))),
        }
    }
    if missing.is_empty() {
        return Ok(0);
    }
    let reader = Reader::open(
        node,
        task.block,
        task.genstamp,
        &sources,
        ReadParams::default(),
    );
    let mut params = WriteParams::new(task.genstamp);
    params.class = TrafficClass::Async;
    let mut w = Writer::create(node, task.block, &missing, params)
        .await
        .map_err(|e| Outcome::Retry(e.to_string()))?;
    let mut off = 0u64;
    while off < task.len {
        let n = (task.len - off).min(4 << 20);
        let data = match reader.read(off, n).await {
            Ok(d) => d,
            Err(crate::read::ReadError::NoReplica { tried, .. })
                if tried.iter().all(|(_, why)| why.contains("asked for")) =>
            {
                return Err(Outcome::Stale(
                    "no source has this genstamp any more".into(),
                ));
            }
            Err(e) => return Err(Outcome::Retry(e.to_string())),
        };
        w.write(data)
            .await
            .map_err(|e| Outcome::Retry(e.to_string()))?;
        off += n;
    }
    let out = w.close().await.map_err(|e| Outcome::Retry(e.to_string()))?;
    if out.replicas.len() < missing.len() {
        return Err(Outcome::Retry(format!(
            "only {} of {} remote replicas written",
            out.replicas.len(),
            missing.len()
        )));
    }
    Ok(task.len)
}

impl Node {
    /// RPO figures of this node's replication log.
    pub fn rpo(&self) -> Result<RpoStatus, ReplicationError> {
        self.shared
            .replicator
            .as_ref()
            .map(|r| r.status())
            .ok_or(ReplicationError::NotConfigured)
    }
}
