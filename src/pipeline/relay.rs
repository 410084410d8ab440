//! The relay side of a pipeline: one per block being written through this node. It opens
//! the local replica, sets up the downstream hop, verifies, forwards and writes each
//! packet, and acks upstream once its own write and the downstream ack are in.
//!
//! Recovery meets a relay in three ways:
//! - A new pipeline for a block arrives while an old relay of the block still runs (its
//!   upstream died, or went silent without closing): the new one — at a higher
//!   generation stamp, or starting the block afresh at the same one — cancels the old
//!   relay and waits for it to wind down (its queued disk writes land first) before
//!   touching the replica. An older pipeline is refused.
//! - Each node waits for its downstream ack `ack_timeout` plus `ack_step` per node below
//!   it, so the node next to a silent hop notices first and names the node behind it.
//! - A recovery may find the replica already finalized (this node finalized on the last
//!   packet before the failure downstream was known): the resent packets are then
//!   checked against the stored checksums instead of rewritten, and the last one moves
//!   the finalized replica to the new generation stamp.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::{Pipelines, SETUP_SEQ, setup_answer, window_for};
use crate::block::{BlockId, ChecksumSpec, GenStamp};
use crate::context::{NodeContext, SiblingSet};
use crate::replication::ReplicationQueue;
use crate::store::{
    BlockStore, Durability, ReplicaState, ReplicaWriter, ReservedWrite, StoreError,
};
use crate::topology::NodeId;
use crate::transport::{FrameReader, FrameWriter, Sink, Source, Stream};
use crate::wire::{Ack, ErrorFrame, Frame, Packet, Status, TrafficClass, WriteBlock};

/// One relay registered for a block.
pub(super) struct Registered {
    genstamp: GenStamp,
    cancel: watch::Sender<bool>,
    done: watch::Receiver<bool>,
}

/// The relays of the blocks being written through this node.
pub(super) type RelayRegistry = std::sync::Mutex<HashMap<BlockId, Registered>>;

/// A relay's own handles: it signals `done` when it has ended; `cancel` tells it to stop.
struct Registration {
    done: watch::Sender<bool>,
    cancel: watch::Receiver<bool>,
}

/// Registers a relay for a `WriteBlock`. A relay of the same block still running is
/// taken over — cancelled and waited for — when this one is newer: a higher generation
/// stamp (a recovery), or a fresh start (not a resume) at the same stamp (an abandoned
/// attempt started again). Otherwise this one is refused.
async fn register(svc: &Pipelines, req: &WriteBlock) -> Result<Registration, (Status, String)> {
    let (block, genstamp) = (req.block, req.genstamp);
    let (done_tx, done_rx) = watch::channel(false);
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let previous = {
        let mut relays = svc.relays.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = relays.get(&block)
            && !*r.done.borrow()
            && (r.genstamp > genstamp || (r.genstamp == genstamp && req.resume))
        {
            return Err((
                Status::Stale,
                format!("a pipeline at {} is writing this block", r.genstamp),
            ));
        }
        relays.insert(
            block,
            Registered {
                genstamp,
                cancel: cancel_tx,
                done: done_rx,
            },
        )
    };
    if let Some(mut old) = previous {
        let _ = old.cancel.send(true);
        let wait = old.done.wait_for(|done| *done);
        if tokio::time::timeout(svc.config.relay_handover_timeout, wait)
            .await
            .is_err()
        {
            return Err((
                Status::Rejected,
                "previous relay of this block did not wind down".into(),
            ));
        }
    }
    Ok(Registration {
        done: done_tx,
        cancel: cancel_rx,
    })
}

/// Runs `f` unless the relay is cancelled first.
async fn unless_cancelled<T>(
    cancel: &mut watch::Receiver<bool>,
    f: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        _ = cancel.wait_for(|c| *c) => None,
        v = f => Some(v),
    }
}

/// [`unless_cancelled`], and `None` too once `stop` says so.
async fn unless_stopped<T>(
    cancel: &mut watch::Receiver<bool>,
    stop: &mut watch::Receiver<bool>,
    f: impl Future<Output = T>,
) -> Option<T> {
    let stopped = async {
        if stop.wait_for(|s| *s).await.is_err() {
            // The ack loop ended without a word: only `true` stops.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        biased;
        _ = stopped => None,
        v = unless_cancelled(cancel, f) => v,
    }
}

/// The setup failed at or below this hop. A new replica nobody will write to is removed
/// again (its packets, if any came with the setup, landed first) before upstream hears of
/// the refusal, so the writer sees no leftovers.
async fn refuse(
    shared: &NodeContext,
    req: &WriteBlock,
    local: Arc<Local>,
    mut up: FrameWriter<Sink>,
    statuses: Vec<Status>,
) {
    remove_unused(shared, req, local, "refused").await;
    let _ = up.send(&setup_ack(statuses)).await;
}

/// Removes the replica a pipeline that never came (`what`: refused, abandoned) created
/// here; a resumed one stays for the writer's next recovery attempt. Every write of it
/// has landed.
async fn remove_unused(shared: &NodeContext, req: &WriteBlock, local: Arc<Local>, what: &str) {
    if req.resume || !matches!(*local, Local::Write(_)) {
        return;
    }
    let gs = local.genstamp();
    drop(local);
    if let Err(e) = shared.store.delete(req.block, gs).await {
        tracing::warn!(block = %req.block, error = %e, "cannot remove the replica of a {what} pipeline");
    }
}

/// A replica this node finalized before a recovery reached it: the resent packets are
/// checked against it, and the last one moves it to the recovery's generation stamp.
struct Complete {
    store: BlockStore,
    block: BlockId,
    genstamp: GenStamp,
    target: GenStamp,
    len: u64,
    spec: ChecksumSpec,
    crcs: Vec<u32>,
}

impl Complete {
    fn check(&self, p: &Packet) -> Result<(), (Status, String)> {
        let bpc = u64::from(self.spec.bytes_per_chunk());
        let n = p.payload.len() as u64;
        let end = p.offset + n;
        let refuse = |why: String| Err((Status::Rejected, why));
        if !p.offset.is_multiple_of(bpc) || end > self.len || (p.flags.last && end != self.len) {
            return refuse(format!(
                "packet {}+{n} does not fit the finalized replica of {} bytes",
                p.offset, self.len
            ));
        }
        let first = (p.offset / bpc) as usize;
        let stored = self.crcs.get(first..first + p.crcs.len());
        if p.crcs.len() as u64 != self.spec.chunks_for(n) || stored != Some(&p.crcs[..]) {
            return refuse(format!(
                "packet at {} differs from the finalized replica",
                p.offset
            ));
        }
        self.spec
            .verify(p.offset / bpc, &p.payload, &p.crcs)
            .map_err(|m| {
                (
                    Status::ChecksumError,
                    format!("chunk {} fails its checksum", m.chunk),
                )
            })
    }

    async fn finish(&self) -> Result<(), StoreError> {
        if self.genstamp < self.target {
            self.store
                .bump_genstamp(self.block, self.genstamp, self.target)
                .await?;
        }
        Ok(())
    }
}

/// The local side of a relay.
enum Local {
    /// A replica being written.
    Write(Arc<ReplicaWriter>),
    /// A finalized replica a recovery checks its packets against.
    Complete(Complete),
}

/// The local write of one packet, started by [`Local::accept`].
enum WriteTask {
    /// Running as a task of its own, so that it overlaps with the packets after it.
    Spawned(tokio::task::JoinHandle<Result<(), StoreError>>),
    /// A block's only packet: nothing comes after it to overlap with, so the ack loop
    /// runs it, and as the replica's last write: the store's committer writes it and
    /// finalizes the replica in one hand-off (a spawned write would cost a task, a
    /// wake-up of another runtime thread and a round trip through an IO thread, per
    /// replica of every small block). Dropped unrun (its pipeline was cancelled), the
    /// reserved write runs on its own, as a plain write.
    Final(ReservedWrite),
}

impl WriteTask {
    /// Waits for the write (and, for [`WriteTask::Final`], the finalize); `None` if its
    /// task died.
    async fn wait(self) -> Option<Result<(), StoreError>> {
        match self {
            WriteTask::Spawned(h) => h.await.ok(),
            WriteTask::Final(w) => Some(w.write_and_finalize().await.map(|_| ())),
        }
    }

    /// Whether a successful [`wait`](Self::wait) leaves the replica final.
    fn finalizes(&self) -> bool {
        matches!(self, WriteTask::Final(_))
    }
}

impl Local {
    fn genstamp(&self) -> GenStamp {
        match self {
            Local::Write(w) => w.genstamp(),
            Local::Complete(c) => c.target,
        }
    }

    fn len(&self) -> u64 {
        match self {
            Local::Write(w) => w.len(),
            Local::Complete(c) => c.len,
        }
    }

    /// Takes one packet: verified (and, for a replica being written, its write started).
    fn accept(&self, p: &Packet, durability: Durability) -> Result<Option<WriteTask>, Status> {
        match self {
            Local::Write(w) => {
                match w.reserve_owned(p.offset, p.payload.clone(), p.crcs.clone()) {
                    Ok(r) if p.flags.last && p.offset == 0 => Ok(Some(WriteTask::Final(r))),
                    Ok(r) => Ok(Some(WriteTask::Spawned(tokio::spawn(r.write(durability))))),
                    Err(e) => {
                        tracing::warn!(block = %w.block(), seq = p.seq, error = %e, "packet refused");
                        Err(Status::from(&e))
                    }
                }
            }
            Local::Complete(c) => c.check(p).map(|()| None).map_err(|(status, why)| {
                tracing::warn!(block = %c.block, seq = p.seq, reason = why, "resent packet refused");
                status
            }),
        }
    }

    /// After the last packet: the replica is final at the pipeline's stamp.
    async fn finish(&self) -> Result<(), StoreError> {
        match self {
            Local::Write(w) => w.finalize().await.map(|_| ()),
            Local::Complete(c) => c.finish().await,
        }
    }
}

/// Opens (or, for a resume, recovers) the local replica for a `WriteBlock`.
async fn open_replica(shared: &NodeContext, req: &WriteBlock) -> Result<Local, (Status, String)> {
    let store = &shared.store;
    let existing = store.get(req.block);
    let fail = |e: StoreError| (Status::from(&e), e.to_string());
    // A resume at offset 0 of a replica this node never got (a retried setup whose first
    // attempt did not reach it), or got nothing of (a replica being written with nothing
    // landed, whose files may not even exist yet), is a first setup here.
    let nothing_here = existing.is_none_or(|r| r.state == ReplicaState::Rbw && r.len == 0);
    if !req.resume || (req.offset == 0 && nothing_here) {
        if let Some(r) = existing {
            if r.state == ReplicaState::Finalized && r.genstamp >= req.genstamp {
                return Err((
                    Status::Exists,
                    format!("{} already finalized at {}", req.block, r.genstamp),
                ));
            }
            if r.genstamp > req.genstamp {
                return Err((
                    Status::Exists,
                    format!("{} has newer {}", req.block, r.genstamp),
                ));
            }
            store.delete(req.block, r.genstamp).await.map_err(fail)?;
        }
        let w = store
            .create(req.block, req.genstamp, req.checksum)
            .await
            .map_err(fail)?;
        return Ok(Local::Write(Arc::new(w)));
    }
    // Resume after recovery: the replica, cut to the resume offset, with the new stamp.
    let r = existing.ok_or((
        Status::NotFound,
        format!("{}: no replica to resume", req.block),
    ))?;
    match r.state {
        ReplicaState::Rbw if r.genstamp <= req.genstamp => {}
        ReplicaState::Finalized if r.genstamp <= req.genstamp && r.len >= req.offset => {
            let reader = store.reader(req.block, r.genstamp).await.map_err(fail)?;
            return Ok(Local::Complete(Complete {
                store: store.clone(),
                block: req.block,
                genstamp: r.genstamp,
                target: req.genstamp,
                len: r.len,
                spec: reader.spec(),
                crcs: reader.checksums(0, r.len).to_vec(),
            }));
        }
        state => {
            return Err((
                Status::Rejected,
                format!(
                    "{}: replica is {state:?} at {} with {} bytes, resume at {}",
                    req.block, r.genstamp, r.len, req.offset
                ),
            ));
        }
    }
    let w = store
        .reopen_rbw(req.block, r.genstamp)
        .await
        .map_err(fail)?;
    if w.len() < req.offset {
        return Err((
            Status::Rejected,
            format!(
                "{}: replica has {} bytes, resume at {}",
                req.block,
                w.len(),
                req.offset
            ),
        ));
    }
    w.truncate_to(req.offset).await.map_err(fail)?;
    if r.genstamp < req.genstamp {
        w.bump_genstamp(req.genstamp).await.map_err(fail)?;
    }
    Ok(Local::Write(Arc::new(w)))
}

/// What an async pipeline's head queues for the remote IDC.
struct RemoteCopy {
    rep: Arc<ReplicationQueue>,
    /// This node and the rest of the local pipeline.
    sources: Vec<String>,
    /// Remote targets, in pipeline order.
    remote: Vec<String>,
}

struct Pending {
    seq: u64,
    last: bool,
    write: Result<Option<WriteTask>, Status>,
}

/// The relay side of a pipeline, for one `WriteBlock` received from upstream.
pub(super) async fn serve(svc: Arc<Pipelines>, mut up: Stream, req: WriteBlock) {
    let block = req.block;
    let mut reg = match register(&svc, &req).await {
        Ok(r) => r,
        Err((status, why)) => {
            let _ = up.writer.send(&setup_ack(vec![status])).await;
            tracing::warn!(%block, reason = why, "relay refused");
            return;
        }
    };
    relay(&svc, up, req, &mut reg.cancel).await;
    let _ = reg.done.send(true);
    let mut relays = svc.relays.lock().unwrap_or_else(|e| e.into_inner());
    if relays.get(&block).is_some_and(|r| *r.done.borrow()) {
        relays.remove(&block);
    }
}

fn setup_ack(statuses: Vec<Status>) -> Frame {
    Frame::Ack(Ack {
        seq: SETUP_SEQ,
        statuses,
    })
}

async fn relay(
    svc: &Arc<Pipelines>,
    mut up: Stream,
    req: WriteBlock,
    cancel: &mut watch::Receiver<bool>,
) {
    let shared = &svc.ctx;
    let topo = shared.topology();
    let block = req.block;
    let mut targets = Vec::with_capacity(req.targets.len());
    for (j, name) in req.targets.iter().enumerate() {
        match topo.node_by_name(name) {
            Some(id) if id != shared.me && !targets.contains(&id) => targets.push(id),
            // Not (or no longer) a node here, say one a reload removed that the writer
            // still knows: blame that hop, not this one, so the writer drops it and
            // goes on with the others. Nothing was opened yet.
            None if !name.is_empty() => {
                let mut blame = vec![Status::Success; j + 1];
                blame.push(Status::Unreachable);
                tracing::warn!(%block, target = %name, "downstream target is not in the topology");
                let _ = up.writer.send(&setup_ack(blame)).await;
                return;
            }
            _ => {
                let _ = up
                    .writer
                    .send(&Frame::Error(ErrorFrame {
                        status: Status::Rejected,
                        message: format!("bad downstream target {name:?}"),
                    }))
                    .await;
                return;
            }
        }
    }
    // Async mode: this node heads the pipeline and owes the remote copy; it needs a log.
    let queue = if req.remote_targets.is_empty() {
        None
    } else {
        match svc.queue.clone() {
            Some(rep) => {
                let mut sources = vec![shared.name(shared.me)];
                sources.extend(req.targets.iter().cloned());
                Some(RemoteCopy {
                    rep,
                    sources,
                    remote: req.remote_targets.clone(),
                })
            }
            None => {
                let _ = up
                    .writer
                    .send(&Frame::Error(ErrorFrame {
                        status: Status::Rejected,
                        message: "async write: this node has no replication log".into(),
                    }))
                    .await;
                return;
            }
        }
    };
    // Gang admission: a slot now or a refusal now, never a wait while upstream hops
    // hold theirs.
    let busy = |refusals: &std::sync::atomic::AtomicU64, what: &str| {
        tracing::debug!(%block, "no {what} slot free");
        refusals.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        setup_ack(vec![Status::Busy])
    };
    let Some(_slot) = svc.try_slot() else {
        let refusal = busy(&shared.metrics.write_busy_refusals, "write");
        let _ = up.writer.send(&refusal).await;
        return;
    };
    // A sync pipeline forwarded across the DCI from here also needs a DCI slot: the
    // link's budget is reserved with the slots, all or nothing.
    let crossing = targets
        .first()
        .map(|&next| topo.location(next).idc)
        .filter(|&idc| idc != topo.location(shared.me).idc && req.class == TrafficClass::Sync);
    let _dci_slot = match crossing.map(|idc| svc.try_dci_slot(idc)).transpose() {
        Ok(slot) => slot.flatten(),
        Err(super::DciBusy) => {
            let refusal = busy(&shared.metrics.dci_busy_refusals, "DCI");
            let _ = up.writer.send(&refusal).await;
            return;
        }
    };
    // The local replica is opened while the next hop is asked for: a setup costs one
    // file creation, not one per hop. Its answer is read beside the packets (see
    // `ack_loop`), so packets sent with the setup are forwarded before it comes.
    let downstream = async {
        let Some(&next) = targets.first() else {
            return Ok(None);
        };
        let down_req = WriteBlock {
            targets: req.targets[1..].to_vec(),
            remote_targets: Vec::new(),
            ..req.clone()
        };
        let timeout = svc.config.setup_timeout;
        let asked = tokio::time::timeout(timeout, async {
            let mut s = shared.transport.open(next).await?;
            s.writer.send(&Frame::WriteBlock(down_req)).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(s)
        })
        .await;
        match asked {
            Ok(Ok(s)) => Ok(Some(s)),
            Ok(Err(e)) => {
                tracing::warn!(%block, next = %shared.name(next), error = %e, "downstream unreachable");
                Err(Status::Unreachable)
            }
            Err(_) => Err(Status::Unreachable),
        }
    };
    let (local, down) = tokio::join!(open_replica(shared, &req), downstream);
    let local = match local {
        Ok(l) => Arc::new(l),
        Err((status, why)) => {
            tracing::warn!(%block, reason = why, "cannot open replica for pipeline");
            if let Ok(Some(mut s)) = down {
                abandon(&mut s.writer, status).await;
                drained(s.reader, svc.config.setup_timeout).await;
            }
            let _ = up.writer.send(&setup_ack(vec![status])).await;
            return;
        }
    };
    let down = match down {
        Ok(d) => d,
        Err(status) => {
            refuse(
                shared,
                &req,
                local,
                up.writer,
                vec![Status::Success, status],
            )
            .await;
            return;
        }
    };

    let down_tier = targets.first().map(|&n| topo.tier(shared.me, n));
    let (down_w, down_r) = match down {
        Some(s) => (Some(s.writer), Some(s.reader)),
        None => (None, None),
    };
    let up_peer = up.peer;
    let up_tier = shared.tier_to(up.peer);
    let Stream {
        reader: mut up_r,
        writer: up_w,
        ..
    } = up;
    let depth =
        (window_for(svc, shared.me, &targets) / svc.config.packet_bytes.max(1)).clamp(16, 4096);
    let (tx, rx) = mpsc::channel::<Pending>(depth);
    let names =
        |v: &[String]| -> Vec<NodeId> { v.iter().filter_map(|n| topo.node_by_name(n)).collect() };
    let siblings = (names(&req.replicas), names(&req.lost));
    // The ack loop says when the setup failed below: nothing more is received then.
    let (stop_tx, mut stop) = watch::channel(false);
    // The ack loop runs beside the receive loop in this task (joined, not spawned): a
    // task per relay and block, and the wake-up of another runtime thread it often cost,
    // were a large part of what a small block cost.
    let acker = ack_loop(
        svc.clone(),
        local.clone(),
        siblings,
        rx,
        up_w,
        down_r,
        targets.len(),
        queue,
        cancel.clone(),
        stop_tx,
    );

    // Receive, verify, forward, write.
    let receive = async {
        let mut down_w = down_w;
        let mut received = false;
        let mut abandoned = None;
        let mut down_ended = false;
        loop {
            let p = match unless_stopped(cancel, &mut stop, up_r.recv()).await {
                Some(Ok(Some(Frame::Packet(p)))) => p,
                // The only frame an upstream hop sends besides packets: see `abandon`.
                Some(Ok(Some(Frame::Error(e)))) if !received => {
                    abandoned = Some(e.status);
                    break;
                }
                // Upstream ended, broke, sent something else, or a newer pipeline took over.
                _ => break,
            };
            received = true;
            shared
                .metrics
                .pipeline_received_bytes
                .add(up_tier, p.payload.len() as u64);
            shared
                .metrics
                .peers
                .received(up_peer, p.payload.len() as u64);
            let last = p.flags.last;
            let seq = p.seq;
            // The last packet needs no fdatasync of its own: finalize fsyncs the replica.
            let durability = if p.flags.sync {
                Durability::Sync
            } else {
                Durability::Buffered
            };
            // A packet that crossed the DCI may be compressed: expand it (bounded) first.
            let p = match crate::dci::compress::decompress(p) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(%block, seq, error = %e, "undecodable compressed packet");
                    let _ = tx
                        .send(Pending {
                            seq,
                            last,
                            write: Err(Status::ChecksumError),
                        })
                        .await;
                    break;
                }
            };
            // Checksums are verified here, before anything is forwarded or written.
            let write = local.accept(&p, durability);
            let bad = write.is_err();
            if !bad && let (Some(w), Some(&next)) = (down_w.as_mut(), targets.first()) {
                let len = p.payload.len() as u64;
                // Across the DCI: compressed when that pays, admitted by the governor.
                let forwarded = unless_stopped(cancel, &mut stop, async {
                    let p = shared
                        .dci
                        .govern_packet(
                            next,
                            req.class,
                            req.spot,
                            req.compression,
                            p,
                            &shared.metrics,
                        )
                        .await;
                    if last {
                        w.send_last(&Frame::Packet(p)).await
                    } else {
                        w.send(&Frame::Packet(p)).await
                    }
                })
                .await;
                match forwarded {
                    Some(Ok(())) => {
                        down_ended = last;
                        if let Some(t) = down_tier {
                            shared.metrics.pipeline_sent_bytes.add(t, len);
                            shared.metrics.peers.sent(next, len);
                        }
                    }
                    // The ack loop sees the broken stream and reports it.
                    Some(Err(_)) => down_w = None,
                    None => {
                        land(write).await;
                        break;
                    }
                }
            }
            // Hand the packet to the ack loop; a write that cannot be handed over lands here,
            // so that no write of this relay outlives it.
            match unless_stopped(cancel, &mut stop, tx.reserve()).await {
                Some(Ok(slot)) => slot.send(Pending { seq, last, write }),
                _ => {
                    land(write).await;
                    break;
                }
            }
            if last {
                // The end of upstream's half came with its last packet: taken now, it
                // lets this relay's last ack carry word that the connection is kept.
                up_r.try_end();
            }
            if bad || last {
                break;
            }
        }
        drop(tx);
        // After a failed setup below, the stream down is dropped, not ended.
        if let Some(mut w) = down_w.filter(|_| !down_ended && !*stop.borrow()) {
            if let Some(status) = abandoned {
                abandon(&mut w, status).await;
            }
            let _ = unless_cancelled(cancel, w.finish()).await;
        }
        abandoned
    };
    let (abandoned, (mut up_w, down_r, refused)) = tokio::join!(receive, acker);
    if let Some(statuses) = refused {
        drop(down_r);
        refuse(shared, &req, local, up_w, statuses).await;
        return;
    }
    // Set up for nothing: an upstream hop could not open its own replica. The new
    // replica nobody will write to is removed, as a refused setup's is, once the hops
    // after this one removed theirs; upstream hears the end of this stream only then.
    // (A pipeline that merely breaks before its first packet keeps its replicas: its
    // recovery resumes them at offset 0.)
    if abandoned.is_some() {
        if let Some(r) = down_r {
            drained(r, svc.config.setup_timeout).await;
        }
        remove_unused(shared, &req, local, "abandoned").await;
    }
    let _ = unless_cancelled(cancel, up_w.finish()).await;
}

/// Reads the next hop's setup ack, answers upstream's setup, then acknowledges each
/// packet once its local write (and, the last, the finalize) and the hops below are done.
/// Returns the streams and, when the setup was refused below, the statuses that upstream
/// has not been told yet (the caller removes the replica first); `stop` tells the receive
/// loop to stop then.
#[allow(clippy::too_many_arguments)]
async fn ack_loop(
    svc: Arc<Pipelines>,
    local: Arc<Local>,
    (replicas, lost): (Vec<NodeId>, Vec<NodeId>),
    mut rx: mpsc::Receiver<Pending>,
    mut up_w: FrameWriter<Sink>,
    mut down_r: Option<FrameReader<Source>>,
    downstream: usize,
    queue: Option<RemoteCopy>,
    mut cancel: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
) -> (
    FrameWriter<Sink>,
    Option<FrameReader<Source>>,
    Option<Vec<Status>>,
) {
    let shared = &svc.ctx;
    let block = req_block(&local);
    // The setup first: the hops below answer while packets may already be arriving.
    // Nothing is finalized or acknowledged before every hop below has said yes.
    // `Some(refused)`: the relay ends here (cancelled, refused below, or upstream gone);
    // `refused` is the refusal upstream has not been told of yet.
    let mut setup = vec![Status::Success];
    let ended = 'setup: {
        if let Some(r) = down_r.as_mut() {
            let answer = tokio::time::timeout(svc.config.setup_timeout, setup_answer(r));
            match unless_cancelled(&mut cancel, answer).await {
                Some(Ok(Ok(st))) if !st.is_empty() => setup.extend(st),
                Some(_) => setup.push(Status::Unreachable),
                None => break 'setup Some(None),
            }
        }
        if setup.iter().any(|s| *s != Status::Success) {
            break 'setup Some(Some(setup));
        }
        let sent = unless_cancelled(&mut cancel, up_w.send(&setup_ack(setup))).await;
        sent.is_none_or(|sent| sent.is_err()).then_some(None)
    };
    if let Some(refused) = ended {
        let _ = stop.send(true);
        settle(rx).await;
        return (up_w, down_r, refused);
    }
    // The node next to a silent hop gives up first: each node further up waits one more
    // step.
    let ack_wait = svc.config.ack_timeout + svc.config.ack_step * downstream as u32;
    let mut down_broken = false;
    loop {
        let Some(Some(p)) = unless_cancelled(&mut cancel, rx.recv()).await else {
            break;
        };
        let finalized = matches!(&p.write, Ok(Some(h)) if h.finalizes());
        let mut local_status = match p.write {
            Ok(Some(h)) => match h.wait().await {
                Some(Ok(())) => Status::Success,
                Some(Err(e)) => {
                    tracing::warn!(%block, error = %e, "local write failed");
                    Status::from(&e)
                }
                None => Status::DiskError,
            },
            Ok(None) => Status::Success,
            Err(s) => s,
        };
        if p.last
            && !finalized
            && local_status == Status::Success
            && let Err(e) = local.finish().await
        {
            tracing::warn!(%block, error = %e, "finalize failed");
            local_status = Status::from(&e);
        }
        let mut statuses = vec![local_status];
        if downstream > 0 {
            let down = if down_broken {
                None
            } else {
                match down_r.as_mut() {
                    Some(r) => {
                        let ack = tokio::time::timeout(ack_wait, r.recv());
                        match unless_cancelled(&mut cancel, ack).await {
                            Some(Ok(Ok(Some(Frame::Ack(a))))) if a.seq == p.seq => Some(a.statuses),
                            None => break,
                            _ => None,
                        }
                    }
                    None => None,
                }
            };
            match down {
                Some(st) => statuses.extend(st),
                None => {
                    down_broken = true;
                    statuses.push(Status::Unreachable);
                }
            }
        }
        // Async head: the block is final in this IDC; queue the remote copy durably
        // before acknowledging the last packet.
        if let (true, Some(q)) = (
            p.last && statuses.iter().all(|s| *s == Status::Success),
            &queue,
        ) {
            let topo = shared.topology();
            let target_idc = q
                .remote
                .first()
                .and_then(|n| topo.node_by_name(n))
                .map(|n| topo.idc(topo.location(n).idc).name.clone())
                .unwrap_or_default();
            let task = crate::replication::Task {
                seq: 0,
                block,
                genstamp: local.genstamp(),
                len: local.len(),
                sources: q.sources.clone(),
                target_idc,
                targets: q.remote.clone(),
                created_ms: 0,
            };
            if let Err(e) = q.rep.append(task).await {
                tracing::error!(%block, error = %e, "cannot queue the remote copy");
                statuses[0] = Status::DiskError;
            }
        }
        let failed = statuses.iter().any(|s| *s != Status::Success);
        // Final here and below: the replica set is what this write made it. (A failure
        // below brings a recovery, which records the set it leaves.)
        if p.last && !failed {
            shared.siblings.record(
                block,
                SiblingSet {
                    genstamp: local.genstamp(),
                    len: local.len(),
                    replicas: replicas.clone(),
                    lost: lost.clone(),
                },
            );
        }
        let ack = Frame::Ack(Ack {
            seq: p.seq,
            statuses,
        });
        // The last ack is only fed: the relay ends the stream right after this loop,
        // and the ack and the end mark go out in one write.
        let sent = if p.last {
            unless_cancelled(&mut cancel, up_w.feed(&ack)).await
        } else {
            unless_cancelled(&mut cancel, up_w.send(&ack)).await
        };
        if !matches!(sent, Some(Ok(()))) || failed {
            break;
        }
    }
    settle(rx).await;
    (up_w, down_r, None)
}

/// Lets the writes still queued for the ack loop land before the replica is handed over
/// (or removed).
async fn settle(mut rx: mpsc::Receiver<Pending>) {
    rx.close();
    while let Some(p) = rx.recv().await {
        land(p.write).await;
    }
}

/// The message of the frame that abandons a pipeline before its first packet.
const ABANDONED: &str = "pipeline abandoned before its first packet";

/// Tells the hops after this one that the pipeline they were set up for will not come:
/// each removes its new replica and passes the word on.
async fn abandon(down: &mut FrameWriter<Sink>, status: Status) {
    let frame = Frame::Error(ErrorFrame {
        status,
        message: ABANDONED.into(),
    });
    if down.send(&frame).await.is_ok() {
        let _ = down.finish().await;
    }
}

/// Waits (at most `limit`) for a downstream hop to end its stream: after an abandon,
/// it has then removed its replica.
async fn drained(mut r: FrameReader<Source>, limit: Duration) {
    let _ = tokio::time::timeout(limit, async { while let Ok(Some(_)) = r.recv().await {} }).await;
}

/// Waits for a local write that no ack loop will see. It finalizes nothing: a replica is
/// final only when the ack loop says so.
async fn land(write: Result<Option<WriteTask>, Status>) {
    match write {
        Ok(Some(WriteTask::Spawned(h))) => {
            let _ = h.await;
        }
        Ok(Some(WriteTask::Final(w))) => {
            let _ = w.write(Durability::Buffered).await;
        }
        _ => {}
    }
}

fn req_block(local: &Local) -> BlockId {
    match local {
        Local::Write(w) => w.block(),
        Local::Complete(c) => c.block,
    }
}
