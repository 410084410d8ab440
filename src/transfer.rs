//! Transfers: copies of finalized blocks from one node to others, made by this node on
//! their behalf: async replication's remote copy (class `async`) and repair's copies
//! (class `repair`, driven by `repair.rs`, which decides what is owed and where).
//!
//! A copy is idempotent: targets that already hold the block finalized at the task's
//! genstamp and length are skipped. The scheduler (`scheduler::route::plan_copy`) plans
//! the rest: a target in an IDC where some node already holds the block is fed by that
//! holder, inside the IDC (this node asks it with a `CopyBlock`); the targets of an IDC
//! with no holder are fed by one pipeline from this node across the DCI, the block read
//! (verified) from the nearest source. A task whose block has moved on (a newer genstamp
//! here, or no source with its genstamp) is obsolete.
//! This module sits above the pipeline and the reader, which it drives; the replication
//! queue drives it through `Copier`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::block::{BlockId, GenStamp};
use crate::context::NodeContext;
use crate::pipeline::{Pipelines, WriteParams, Writer};
use crate::read::{ReadError, ReadParams, Reader, ReplicaFailure};
use crate::replication::{Copier, CopyFailure, Task};
use crate::scheduler::route::{Leg, SourceLoad, plan_copy};
use crate::store::ReplicaState;
use crate::topology::NodeId;
use crate::topology::Tier;
use crate::wire::{Compression, CopyBlock, Frame, ReadBlock, Status, TrafficClass};

/// The transfer service of one node, for one traffic class.
pub(crate) struct Transfers {
    ctx: Arc<NodeContext>,
    pipelines: Arc<Pipelines>,
    /// Legs running per source, so plans spread over equally near sources.
    load: Mutex<SourceLoad>,
    class: TrafficClass,
}

/// What a node holds of a block at a genstamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// The finalized replica, whole.
    Holds,
    /// A replica at that stamp still being written (a pipeline is finishing it).
    Writing,
    /// Nothing usable.
    Lacks,
}

/// One block to copy: what every leg of a plan needs to know.
pub(crate) struct CopyJob<'a> {
    pub(crate) block: BlockId,
    pub(crate) genstamp: GenStamp,
    pub(crate) len: u64,
    /// Holders this node may read from when a leg runs through it.
    pub(crate) sources: &'a [NodeId],
    /// The block's replica set once the copy is done (the new replicas record it).
    pub(crate) replicas: &'a [NodeId],
}

impl Transfers {
    pub(crate) fn new(
        ctx: Arc<NodeContext>,
        pipelines: Arc<Pipelines>,
        class: TrafficClass,
    ) -> Arc<Transfers> {
        Arc::new(Transfers {
            ctx,
            pipelines,
            load: Mutex::new(SourceLoad::default()),
            class,
        })
    }

    /// Plans copies of a block from `holders` to `missing` (`None`: no holder).
    pub(crate) fn plan(
        &self,
        holders: &[NodeId],
        missing: &[NodeId],
    ) -> Option<crate::scheduler::route::CopyPlan> {
        let mut load = self.load.lock().unwrap_or_else(|e| e.into_inner());
        plan_copy(&self.ctx.topology(), holders, missing, &mut load)
    }

    /// Runs every leg of `plan` at once; an obsolete leg makes the whole obsolete,
    /// otherwise any failed leg makes it a retry (legs that worked are skipped next time).
    pub(crate) async fn run_plan(
        &self,
        job: &CopyJob<'_>,
        plan: &crate::scheduler::route::CopyPlan,
    ) -> Result<(), CopyFailure> {
        let legs = plan.legs.iter().map(|leg| async move {
            let r = self.run_leg(job, leg).await;
            self.load
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(leg.source);
            r
        });
        let results = futures_util::future::join_all(legs).await;
        let mut retry = None;
        for r in results {
            match r {
                Err(CopyFailure::Obsolete(why)) => return Err(CopyFailure::Obsolete(why)),
                Err(e) => retry = Some(e),
                Ok(()) => {}
            }
        }
        retry.map_or(Ok(()), Err)
    }

    /// Whether `peer` holds `block` finalized at `gs` with `len` bytes.
    pub(crate) async fn has_replica(
        &self,
        peer: NodeId,
        block: BlockId,
        gs: GenStamp,
        len: u64,
    ) -> Result<bool, String> {
        Ok(self.probe(peer, block, gs, len).await? == Probe::Holds)
    }

    /// What `peer` holds of `block` at `gs`: the finalized replica of `len` bytes, a
    /// replica still being written at that stamp, or neither.
    pub(crate) async fn probe(
        &self,
        peer: NodeId,
        block: BlockId,
        gs: GenStamp,
        len: u64,
    ) -> Result<Probe, String> {
        let ctx = &self.ctx;
        if peer == ctx.me {
            return Ok(match ctx.store.get(block) {
                Some(r)
                    if r.genstamp == gs && r.state == ReplicaState::Finalized && r.len == len =>
                {
                    Probe::Holds
                }
                Some(r) if r.genstamp == gs && r.state == ReplicaState::Rbw => Probe::Writing,
                _ => Probe::Lacks,
            });
        }
        let mut s = ctx.transport.open(peer).await.map_err(|e| e.to_string())?;
        let probe = Frame::ReadBlock(ReadBlock {
            block,
            genstamp: gs,
            offset: 0,
            len: 0,
            class: self.class,
            compression: Compression::None,
        });
        s.writer
            .send_last(&probe)
            .await
            .map_err(|e| e.to_string())?;
        match s.reader.recv().await.map_err(|e| e.to_string())? {
            Some(Frame::ReadResponse(r)) if r.status == Status::Success => {
                Ok(match (r.finalized, r.replica_len == len) {
                    (true, true) => Probe::Holds,
                    (false, _) => Probe::Writing,
                    (true, false) => Probe::Lacks,
                })
            }
            _ => Ok(Probe::Lacks),
        }
    }

    /// One attempt at a task; returns the bytes copied across.
    async fn copy_once(&self, task: &Task) -> Result<u64, CopyFailure> {
        let ctx = &self.ctx;
        let topo = ctx.topology();
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
        let mut holders = sources.clone();
        for &t in &targets {
            match self
                .has_replica(t, task.block, task.genstamp, task.len)
                .await
            {
                Ok(true) => holders.push(t),
                Ok(false) => missing.push(t),
                Err(e) => return Err(CopyFailure::Retry(format!("probe {}: {e}", ctx.name(t)))),
            }
        }
        if missing.is_empty() {
            return Ok(0);
        }
        let plan = self
            .plan(&holders, &missing)
            .ok_or_else(|| CopyFailure::Retry("no source for the block".into()))?;
        let replicas: Vec<NodeId> = holders.iter().chain(&missing).copied().collect();
        let job = CopyJob {
            block: task.block,
            genstamp: task.genstamp,
            len: task.len,
            sources: &sources,
            replicas: &replicas,
        };
        self.run_plan(&job, &plan).await?;
        Ok(task.len)
    }

    /// Runs one leg of a plan: through this node when the leg starts from the task's
    /// sources (across the DCI), or by asking the holder to copy inside its IDC.
    async fn run_leg(&self, job: &CopyJob<'_>, leg: &Leg) -> Result<(), CopyFailure> {
        if leg.tier == Tier::Dci || job.sources.contains(&leg.source) {
            return self.copy_through_me(job, &leg.targets).await;
        }
        let ctx = &self.ctx;
        let names = |v: &[NodeId]| v.iter().map(|&t| ctx.name(t)).collect();
        let req = CopyBlock {
            block: job.block,
            genstamp: job.genstamp,
            len: job.len,
            targets: names(&leg.targets),
            class: self.class,
            replicas: names(job.replicas),
        };
        // Bounded: the holder's own pipeline has ack timeouts, but a holder that stops
        // answering must not hold the task forever (30 s plus 1 s per 10 MB).
        let limit = Duration::from_secs(30) + Duration::from_millis(job.len / 10_000);
        match tokio::time::timeout(limit, self.pipelines.ask_copy(leg.source, req)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CopyFailure::Retry(format!(
                "copy from {}: {e}",
                ctx.name(leg.source)
            ))),
            Err(_) => Err(CopyFailure::Retry(format!(
                "copy from {}: no answer within {limit:?}",
                ctx.name(leg.source)
            ))),
        }
    }

    /// Reads the block from the nearest of `sources` and writes it through one pipeline
    /// from this node to `missing`.
    async fn copy_through_me(
        &self,
        job: &CopyJob<'_>,
        missing: &[NodeId],
    ) -> Result<(), CopyFailure> {
        let ctx = &self.ctx;
        let reader = Reader::open(
            ctx.clone(),
            job.block,
            job.genstamp,
            job.sources,
            ReadParams::default(),
        );
        let mut params = WriteParams::new(job.genstamp);
        params.class = self.class;
        params.holders = job
            .replicas
            .iter()
            .filter(|n| !missing.contains(n))
            .copied()
            .collect();
        // A copy keeps the block's genstamp; a failed target fails this attempt.
        params.recover = false;
        // The setup travels with the first data: a small block's copy across the DCI costs
        // one round trip over it, not two. (A refusal then fails a write or the close
        // instead of the creation: a retry either way.)
        params.setup_with_first_packet = true;
        // The pipeline to the targets opens only once the source has answered, so that an
        // obsolete task leaves nothing behind on them.
        let mut w: Option<Writer> = None;
        let mut off = 0u64;
        while off < job.len || w.is_none() {
            let n = (job.len - off).min(4 << 20);
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
                    Writer::create(&self.pipelines, job.block, missing, params.clone())
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
        Ok(())
    }
}

impl Copier for Transfers {
    fn copy<'a>(&'a self, task: &'a Task) -> BoxFuture<'a, Result<u64, CopyFailure>> {
        Box::pin(self.copy_once(task))
    }
}
