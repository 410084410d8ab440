//! The relay side of a pipeline: one per block being written through this node. It opens
//! the local replica, sets up the downstream hop, verifies, forwards and writes each
//! packet, and acks upstream once its own write and the downstream ack are in.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::{Pipelines, SETUP_SEQ, setup_exchange, window_for};
use crate::block::BlockId;
use crate::context::NodeContext;
use crate::replication::ReplicationQueue;
use crate::store::{Durability, ReplicaState, ReplicaWriter, StoreError};
use crate::transport::{FrameWriter, Sink, Stream};
use crate::wire::{Ack, ErrorFrame, Frame, Status, WriteBlock};

/// Relays of the blocks being written through this node, so that a recovery pipeline
/// waits for the old relay of the same block to finish before touching the replica.
pub(super) type RelayRegistry = std::sync::Mutex<HashMap<BlockId, watch::Receiver<bool>>>;

/// Registers this relay for `block`, waiting for an earlier relay of the same block (an
/// old pipeline being torn down) to finish. Returns the sender to signal completion.
async fn register_relay(svc: &Pipelines, block: BlockId) -> Result<watch::Sender<bool>, String> {
    let (tx, rx) = watch::channel(false);
    let previous = {
        let mut relays = svc.relays.lock().unwrap_or_else(|e| e.into_inner());
        relays.insert(block, rx)
    };
    if let Some(mut old) = previous {
        let wait = old.wait_for(|done| *done);
        if tokio::time::timeout(svc.config.relay_handover_timeout, wait)
            .await
            .is_err()
        {
            return Err("previous relay of this block did not finish".into());
        }
    }
    Ok(tx)
}

/// Opens (or, for a resume, recovers) the local replica for a `WriteBlock`.
async fn open_replica(
    shared: &NodeContext,
    req: &WriteBlock,
) -> Result<Arc<ReplicaWriter>, (Status, String)> {
    let store = &shared.store;
    let existing = store.get(req.block);
    if req.offset == 0 {
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
            store
                .delete(req.block, r.genstamp)
                .await
                .map_err(|e| (Status::from(&e), e.to_string()))?;
        }
        let w = store
            .create(req.block, req.genstamp, req.checksum)
            .await
            .map_err(|e| (Status::from(&e), e.to_string()))?;
        return Ok(Arc::new(w));
    }
    // Resume after recovery: the rbw replica, cut to the resume offset, with the new stamp.
    let r = existing.ok_or((
        Status::NotFound,
        format!("{}: no replica to resume", req.block),
    ))?;
    if r.state != ReplicaState::Rbw || r.genstamp > req.genstamp {
        return Err((
            Status::Rejected,
            format!("{}: replica is {:?} at {}", req.block, r.state, r.genstamp),
        ));
    }
    let w = store
        .reopen_rbw(req.block, r.genstamp)
        .await
        .map_err(|e| (Status::from(&e), e.to_string()))?;
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
    w.truncate_to(req.offset)
        .await
        .map_err(|e| (Status::from(&e), e.to_string()))?;
    if r.genstamp < req.genstamp {
        w.bump_genstamp(req.genstamp)
            .await
            .map_err(|e| (Status::from(&e), e.to_string()))?;
    }
    Ok(Arc::new(w))
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
    write: Result<tokio::task::JoinHandle<Result<(), StoreError>>, Status>,
}

/// The relay side of a pipeline, for one `WriteBlock` received from upstream.
pub(super) async fn serve(svc: Arc<Pipelines>, up: Stream, req: WriteBlock) {
    let block = req.block;
    let done = match register_relay(&svc, block).await {
        Ok(tx) => tx,
        Err(why) => {
            let mut up = up;
            let _ = up.writer.send(&setup_ack(vec![Status::Rejected])).await;
            tracing::warn!(%block, reason = why, "relay refused");
            return;
        }
    };
    relay(&svc, up, req).await;
    let _ = done.send(true);
    let mut relays = svc.relays.lock().unwrap_or_else(|e| e.into_inner());
    if relays.get(&block).is_some_and(|rx| *rx.borrow()) {
        relays.remove(&block);
    }
}

fn setup_ack(statuses: Vec<Status>) -> Frame {
    Frame::Ack(Ack {
        seq: SETUP_SEQ,
        statuses,
    })
}

async fn relay(svc: &Arc<Pipelines>, mut up: Stream, req: WriteBlock) {
    let shared = &svc.ctx;
    let topo = &shared.topology;
    let block = req.block;
    let mut targets = Vec::with_capacity(req.targets.len());
    for name in &req.targets {
        match topo.node_by_name(name) {
            Some(id) if id != shared.me && !targets.contains(&id) => targets.push(id),
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
                let mut sources = vec![shared.name(shared.me).to_string()];
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
    let writer = match open_replica(shared, &req).await {
        Ok(w) => w,
        Err((status, why)) => {
            tracing::warn!(%block, reason = why, "cannot open replica for pipeline");
            let _ = up.writer.send(&setup_ack(vec![status])).await;
            return;
        }
    };

    // Downstream hop.
    let mut down: Option<Stream> = None;
    let mut statuses = vec![Status::Success];
    if let Some(&next) = targets.first() {
        let down_req = WriteBlock {
            targets: req.targets[1..].to_vec(),
            remote_targets: Vec::new(),
            ..req.clone()
        };
        let timeout = svc.config.setup_timeout;
        let opened = tokio::time::timeout(timeout, shared.transport.open(next)).await;
        match opened {
            Ok(Ok(mut s)) => {
                match tokio::time::timeout(timeout, setup_exchange(&mut s, down_req)).await {
                    Ok(Ok(st)) if !st.is_empty() => {
                        let ok = st.iter().all(|x| *x == Status::Success);
                        statuses.extend(st);
                        if ok {
                            down = Some(s);
                        }
                    }
                    _ => statuses.push(Status::Unreachable),
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(%block, next = %shared.name(next), error = %e, "downstream unreachable");
                statuses.push(Status::Unreachable);
            }
            Err(_) => statuses.push(Status::Unreachable),
        }
    }
    let setup_ok = statuses.iter().all(|s| *s == Status::Success);
    if !setup_ok && req.offset == 0 {
        // A new replica nobody will write to is removed again, before upstream hears of
        // the refusal (so the writer sees no leftovers); a resumed one stays for the
        // writer's next recovery attempt.
        let gs = writer.genstamp();
        drop(writer);
        if let Err(e) = shared.store.delete(block, gs).await {
            tracing::warn!(%block, error = %e, "cannot remove the replica of a refused pipeline");
        }
        let _ = up.writer.send(&setup_ack(statuses)).await;
        return;
    }
    if up.writer.send(&setup_ack(statuses)).await.is_err() || !setup_ok {
        return;
    }

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
    let acker = tokio::spawn(ack_loop(
        svc.clone(),
        writer.clone(),
        rx,
        up_w,
        down_r,
        targets.len(),
        queue,
    ));

    // Receive, verify, forward, write.
    let mut down_w = down_w;
    loop {
        let p = match up_r.recv().await {
            Ok(Some(Frame::Packet(p))) => p,
            Ok(None) => break,
            Ok(Some(_)) | Err(_) => break,
        };
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
        let write =
            match writer.try_write_owned(p.offset, p.payload.clone(), p.crcs.clone(), durability) {
                Ok(fut) => Ok(tokio::spawn(fut)),
                Err(e) => {
                    tracing::warn!(%block, seq, error = %e, "packet refused");
                    Err(Status::from(&e))
                }
            };
        let bad = write.is_err();
        if !bad && let (Some(w), Some(&next)) = (down_w.as_mut(), targets.first()) {
            let len = p.payload.len() as u64;
            // Across the DCI: compressed when that pays, admitted by the governor.
            let p = shared
                .dci
                .govern_packet(next, req.class, req.compression, p, &shared.metrics)
                .await;
            if w.send(&Frame::Packet(p)).await.is_err() {
                down_w = None; // the ack loop sees the broken stream and reports it
            } else if let Some(t) = down_tier {
                shared.metrics.pipeline_sent_bytes.add(t, len);
                shared.metrics.peers.sent(next, len);
            }
        }
        if tx.send(Pending { seq, last, write }).await.is_err() || bad || last {
            break;
        }
    }
    drop(tx);
    if let Some(mut w) = down_w {
        let _ = w.finish().await;
    }
    let _ = acker.await;
}

async fn ack_loop(
    svc: Arc<Pipelines>,
    writer: Arc<ReplicaWriter>,
    mut rx: mpsc::Receiver<Pending>,
    mut up_w: FrameWriter<Sink>,
    mut down_r: Option<crate::transport::FrameReader<crate::transport::Source>>,
    downstream: usize,
    queue: Option<RemoteCopy>,
) {
    let shared = &svc.ctx;
    let block = writer.block();
    let mut down_broken = false;
    while let Some(p) = rx.recv().await {
        let mut local = match p.write {
            Ok(h) => match h.await {
                Ok(Ok(())) => Status::Success,
                Ok(Err(e)) => {
                    tracing::warn!(%block, error = %e, "local write failed");
                    Status::from(&e)
                }
                Err(_) => Status::DiskError,
            },
            Err(s) => s,
        };
        if p.last
            && local == Status::Success
            && let Err(e) = writer.finalize().await
        {
            tracing::warn!(%block, error = %e, "finalize failed");
            local = Status::from(&e);
        }
        let mut statuses = vec![local];
        if downstream > 0 {
            let down = if down_broken {
                None
            } else {
                match down_r.as_mut() {
                    Some(r) => match tokio::time::timeout(svc.config.ack_timeout, r.recv()).await {
                        Ok(Ok(Some(Frame::Ack(a)))) if a.seq == p.seq => Some(a.statuses),
                        _ => None,
                    },
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
            let topo = &shared.topology;
            let target_idc = q
                .remote
                .first()
                .and_then(|n| topo.node_by_name(n))
                .map(|n| topo.idc(topo.location(n).idc).name.clone())
                .unwrap_or_default();
            let task = crate::replication::Task {
                seq: 0,
                block,
                genstamp: writer.genstamp(),
                len: writer.len(),
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
        if up_w
            .send(&Frame::Ack(Ack {
                seq: p.seq,
                statuses,
            }))
            .await
            .is_err()
            || failed
        {
            break;
        }
    }
    // Let any writes still queued land before the replica is handed over.
    while let Some(p) = rx.recv().await {
        if let Ok(h) = p.write {
            let _ = h.await;
        }
    }
    let _ = up_w.finish().await;
}
