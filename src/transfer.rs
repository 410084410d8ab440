//! Transfers: copies of finalized blocks from one node to others, made by this node on
//! their behalf. Today that is async replication's remote copy; repair will be the next.
//!
//! A copy is idempotent: targets that already hold the block finalized at the task's
//! genstamp and length are skipped; the block is read (verified) from the nearest source
//! that has it and written through a pipeline to the targets that do not. A task whose
//! block has moved on (a newer genstamp here, or no source with its genstamp) is obsolete.
//! This module sits above the pipeline and the reader, which it drives; the replication
//! queue drives it through [`Copier`].

use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::block::{BlockId, GenStamp};
use crate::context::NodeContext;
use crate::pipeline::{Pipelines, WriteParams, Writer};
use crate::read::{ReadError, ReadParams, Reader, ReplicaFailure};
use crate::replication::{Copier, CopyFailure, Task};
use crate::store::ReplicaState;
use crate::topology::NodeId;
use crate::wire::{Compression, Frame, ReadBlock, Status, TrafficClass};

/// The transfer service of one node.
pub(crate) struct Transfers {
    ctx: Arc<NodeContext>,
    pipelines: Arc<Pipelines>,
}

impl Transfers {
    pub(crate) fn new(ctx: Arc<NodeContext>, pipelines: Arc<Pipelines>) -> Arc<Transfers> {
        Arc::new(Transfers { ctx, pipelines })
    }

    /// Whether `peer` holds `block` finalized at `gs` with `len` bytes.
    async fn has_replica(
        &self,
        peer: NodeId,
        block: BlockId,
        gs: GenStamp,
        len: u64,
    ) -> Result<bool, String> {
        let ctx = &self.ctx;
        if peer == ctx.me {
            return Ok(ctx.store.get(block).is_some_and(|r| {
                r.genstamp == gs && r.len == len && r.state == ReplicaState::Finalized
            }));
        }
        let mut s = ctx.transport.open(peer).await.map_err(|e| e.to_string())?;
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
            Some(Frame::ReadResponse(r)) => {
                Ok(r.status == Status::Success && r.finalized && r.replica_len == len)
            }
            _ => Ok(false),
        }
    }

    /// One attempt at a task; returns the bytes copied across.
    async fn copy_once(&self, task: &Task) -> Result<u64, CopyFailure> {
        let ctx = &self.ctx;
        let topo = &ctx.topology;
        let ids = |names: &[String]| -> Vec<NodeId> {
            names.iter().filter_map(|n| topo.node_by_name(n)).collect()
        };
        let (sources, targets) = (ids(&task.sources), ids(&task.targets));
        if let Some(r) = ctx.store.get(task.block)
            && r.genstamp > task.genstamp
        {
            return Err(CopyFailure::Obsolete(format!(
                "local replica is at {}",
                r.genstamp
            )));
        }
        let mut missing = Vec::new();
        for &t in &targets {
            match self
                .has_replica(t, task.block, task.genstamp, task.len)
                .await
            {
                Ok(true) => {}
                Ok(false) => missing.push(t),
                Err(e) => return Err(CopyFailure::Retry(format!("probe {}: {e}", ctx.name(t)))),
            }
        }
        if missing.is_empty() {
            return Ok(0);
        }
        let reader = Reader::open(
            ctx.clone(),
            task.block,
            task.genstamp,
            &sources,
            ReadParams::default(),
        );
        let mut params = WriteParams::new(task.genstamp);
        params.class = TrafficClass::Async;
        // A copy keeps the block's genstamp; a failed target fails this attempt.
        params.recover = false;
        // The pipeline to the targets opens only once the source has answered, so that an
        // obsolete task leaves nothing behind on them.
        let mut w: Option<Writer> = None;
        let mut off = 0u64;
        while off < task.len || w.is_none() {
            let n = (task.len - off).min(4 << 20);
            let data = match reader.read(off, n).await {
                Ok(d) => d,
                // Every source answered, and none holds this genstamp any more: the block
                // moved on or was deleted. (A source that cannot be reached is a retry.)
                Err(ReadError::NoReplica { tried, .. })
                    if !tried.is_empty()
                        && tried.iter().all(|(_, f)| {
                            matches!(f, ReplicaFailure::Stale { .. } | ReplicaFailure::Missing)
                        }) =>
                {
                    return Err(CopyFailure::Obsolete(
                        "no source holds the block at this genstamp any more".into(),
                    ));
                }
                Err(e) => return Err(CopyFailure::Retry(e.to_string())),
            };
            let writer = match w.as_mut() {
                Some(writer) => writer,
                None => w.insert(
                    Writer::create(&self.pipelines, task.block, &missing, params.clone())
                        .await
                        .map_err(|e| CopyFailure::Retry(e.to_string()))?,
                ),
            };
            writer
                .write(data)
                .await
                .map_err(|e| CopyFailure::Retry(e.to_string()))?;
            off += n;
        }
        let Some(w) = w else {
            return Err(CopyFailure::Retry("nothing copied".into()));
        };
        let out = w
            .close()
            .await
            .map_err(|e| CopyFailure::Retry(e.to_string()))?;
        if out.replicas.len() < missing.len() {
            return Err(CopyFailure::Retry(format!(
                "only {} of {} remote replicas written",
                out.replicas.len(),
                missing.len()
            )));
        }
        Ok(task.len)
    }
}

impl Copier for Transfers {
    fn copy<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<u64, CopyFailure>> {
        Box::pin(self.copy_once(task))
    }
}
