//! The prefix copy: a node asked by a recovering writer copies the acknowledged prefix of
//! its replica to a spare, which then joins the pipeline in the failed node's place.

use std::sync::Arc;

use super::{Pipelines, SETUP_SEQ, WriteParams, Writer, open_hop};
use crate::context::SiblingSet;
use crate::store::ReplicaState;
use crate::topology::NodeId;
use crate::transport::Stream;
use crate::wire::{Ack, CopyBlock, ErrorFrame, Frame, Status};

/// Asks `source` to copy its replica (the first `req.len` bytes) to `req.targets`.
pub(super) async fn ask_copy(
    svc: &Arc<Pipelines>,
    source: NodeId,
    req: CopyBlock,
) -> Result<(), String> {
    let mut s = open_hop(svc, source).await.map_err(|e| e.to_string())?;
    s.writer
        .send(&Frame::CopyBlock(req))
        .await
        .map_err(|e| e.to_string())?;
    match s.reader.recv().await.map_err(|e| e.to_string())? {
        Some(Frame::Ack(a))
            if a.seq == SETUP_SEQ && a.statuses.iter().all(|s| *s == Status::Success) =>
        {
            Ok(())
        }
        Some(Frame::Error(e)) => Err(format!("{:?}: {}", e.status, e.message)),
        other => Err(format!("unexpected answer {other:?}")),
    }
}

/// Serves a `CopyBlock`: streams the first `len` bytes of the local replica to the
/// targets. A whole finalized replica is finalized there too; a prefix (a pipeline
/// replacement) is left in `rbw` at the source's genstamp, ready to be resumed.
pub(super) async fn serve(svc: Arc<Pipelines>, mut up: Stream, req: CopyBlock) {
    let result = copy_prefix(&svc, &req).await;
    let answer = match result {
        Ok(()) => Frame::Ack(Ack {
            seq: SETUP_SEQ,
            statuses: vec![Status::Success],
        }),
        Err((status, message)) => {
            tracing::warn!(block = %req.block, reason = message, "copy request failed");
            Frame::Error(ErrorFrame { status, message })
        }
    };
    let _ = up.writer.send(&answer).await;
}

async fn copy_prefix(svc: &Arc<Pipelines>, req: &CopyBlock) -> Result<(), (Status, String)> {
    let shared = &svc.ctx;
    let info = shared
        .store
        .get(req.block)
        .ok_or((Status::NotFound, format!("{}: no replica here", req.block)))?;
    if info.state == ReplicaState::Corrupt
        || info.len < req.len
        || info.genstamp < req.genstamp && info.state == ReplicaState::Finalized
    {
        return Err((
            Status::Rejected,
            format!(
                "{}: replica {:?} at {} has {} bytes",
                req.block, info.state, info.genstamp, info.len
            ),
        ));
    }
    let targets: Vec<NodeId> = req
        .targets
        .iter()
        .map(|n| {
            shared
                .topology()
                .node_by_name(n)
                .ok_or((Status::Rejected, format!("unknown target {n:?}")))
        })
        .collect::<Result<_, _>>()?;
    let reader = shared
        .store
        .reader(req.block, info.genstamp)
        .await
        .map_err(|e| (Status::from(&e), e.to_string()))?;
    let mut params = WriteParams::new(info.genstamp);
    params.class = req.class;
    // A copy keeps the source's genstamp; a failed target fails it.
    params.recover = false;
    params.checksum = reader.spec();
    let whole = info.state == ReplicaState::Finalized && req.len == info.len;
    if whole {
        // The new replicas record the set the requester names (without the nodes they
        // replace); this node's own record moves to it once the copy is done.
        params.holders = req
            .replicas
            .iter()
            .filter_map(|n| shared.topology().node_by_name(n))
            .filter(|n| !targets.contains(n))
            .collect();
        if !params.holders.contains(&shared.me) {
            params.holders.insert(0, shared.me);
        }
    }
    let holders = params.holders.clone();
    let mut w = Writer::create(svc, req.block, &targets, params)
        .await
        .map_err(|e| (Status::Unreachable, e.to_string()))?;
    let mut off = 0;
    while off < req.len {
        let n = (req.len - off).min(4 << 20) as usize;
        let data = reader
            .read(off, n)
            .await
            .map_err(|e| (Status::from(&e), e.to_string()))?;
        w.write(data)
            .await
            .map_err(|e| (Status::Unreachable, e.to_string()))?;
        off += n as u64;
    }
    if whole {
        w.close()
            .await
            .map_err(|e| (Status::Unreachable, e.to_string()))?;
        if !req.replicas.is_empty() {
            shared.siblings.record(
                req.block,
                SiblingSet {
                    genstamp: info.genstamp,
                    len: info.len,
                    replicas: holders.into_iter().chain(targets).collect(),
                    lost: Vec::new(),
                },
            );
        }
    } else {
        // Leave the copy in rbw: the pipeline resumes it under a new genstamp.
        w.hflush()
            .await
            .map_err(|e| (Status::Unreachable, e.to_string()))?;
    }
    Ok(())
}
