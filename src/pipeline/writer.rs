//! The writer side of a pipeline: [`Writer`] streams one block through the targets,
//! keeps a window of packets in flight, and recovers when a node fails.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::window::{AckFault, IdcLost, Window};
use super::{
    Pipelines, SetupFailure, WriteError, WriteOutcome, WriteParams, copy, open_hop, setup_answer,
    window_for,
};
use crate::block::{BlockId, GenStamp};
use crate::context::{NodeContext, NodeEvent};
use crate::scheduler::shares::Provisioning;
use crate::topology::NodeId;
use crate::transport::{FrameWriter, Sink, Stream};
use crate::wire::{
    self, Ack, Compression, Frame, Packet, PacketFlags, Status, TrafficClass, WriteBlock, WriteMode,
};

/// Why a target a topology reload removed leaves a pipeline.
const REMOVED: &str = "removed from the topology";

enum AckMsg {
    Ack(Ack),
    Broken(String),
}

struct Pipe {
    sink: FrameWriter<Sink>,
    /// The writer's side of the stream has ended (after the last packet).
    ended: bool,
    acks: mpsc::Receiver<AckMsg>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Latency of packet acks, in microseconds.
pub type AckHistogram = hdrhistogram::Histogram<u64>;

/// Streams one block through a pipeline of nodes. See the module docs of `pipeline::writer`.
pub struct Writer {
    ctx: Arc<NodeContext>,
    svc: Arc<Pipelines>,
    block: BlockId,
    params: WriteParams,
    /// The pipeline, the packets in flight and what is acknowledged.
    win: Window,
    /// Async mode: targets left to background replication.
    remote: Vec<NodeId>,
    /// Every target the write started with (with `remote`), to tell what a recovery lost.
    planned: Vec<NodeId>,
    pipe: Option<Pipe>,
    /// Bytes not yet sent; starts at `buf_offset` (a chunk boundary).
    buf: BytesMut,
    buf_offset: u64,
    /// Bytes of `buf` already sent by an hflush (the partial chunk is resent later).
    flushed_in_buf: usize,
    window_bytes: usize,
    broken: bool,
    /// No node was contacted yet: the setup goes out with the first packet
    /// ([`WriteParams::setup_with_first_packet`]).
    setup_pending: bool,
    /// A setup went out with packets: the hops it reached may hold the replica (even
    /// final), so a first setup tried again resumes at offset 0 instead of creating.
    sent_with_setup: bool,
    ack_us: AckHistogram,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("block", &self.block)
            .field("genstamp", &self.win.genstamp())
            .field("targets", &self.targets())
            .field("acked_len", &self.win.acked_len())
            .finish()
    }
}

impl Writer {
    /// Sets up a pipeline through `targets` (in pipeline order, e.g. from
    /// [`placement`](crate::placement)) for a new block, written from the node of `svc`
    /// (the public way in is `Node::writer`).
    pub(crate) async fn create(
        svc: &Arc<Pipelines>,
        block: BlockId,
        targets: &[NodeId],
        mut params: WriteParams,
    ) -> Result<Writer, WriteError> {
        let shared = &svc.ctx;
        let topo = shared.topology();
        if targets.is_empty() || targets.len() > wire::MAX_TARGETS + 1 {
            return Err(WriteError::InvalidTargets(format!(
                "{} targets (1..={})",
                targets.len(),
                wire::MAX_TARGETS + 1
            )));
        }
        for (i, t) in targets.iter().enumerate() {
            if !topo.contains(*t) {
                return Err(WriteError::InvalidTargets(format!(
                    "target {t:?} not in topology"
                )));
            }
            if targets[..i].contains(t) {
                return Err(WriteError::InvalidTargets(format!(
                    "{} appears twice",
                    topo.node(*t).name
                )));
            }
        }
        let mut targets = targets.to_vec();
        let mut remote = Vec::new();
        if params.mode == WriteMode::Async {
            // The head (first target) keeps the task; when that is this node it must have
            // a log. The RPO guard is consulted where a log is at hand.
            if targets[0] == shared.me && svc.queue.is_none() {
                return Err(WriteError::Replication {
                    block,
                    source: crate::replication::ReplicationError::NotConfigured,
                });
            }
            let admission = match svc.queue.clone() {
                Some(rep) => rep.admit().await,
                None => crate::replication::Admission::Async,
            };
            match admission {
                crate::replication::Admission::Async => {
                    let idc = topo.location(targets[0]).idc;
                    let local = targets
                        .iter()
                        .take_while(|&&t| topo.location(t).idc == idc)
                        .count();
                    remote = targets.split_off(local);
                }
                crate::replication::Admission::Sync => {
                    tracing::warn!(%block, "RPO bound exceeded: writing in sync mode");
                    params.mode = WriteMode::Sync;
                }
            }
        }
        let window_bytes = window_for(svc, shared.me, &targets);
        let win = Window::new(
            targets.iter().map(|&t| (t, topo.location(t).idc)).collect(),
            params.genstamp,
            window_bytes,
            // The writer waits longest: every node below it gives up before it does.
            svc.config.ack_timeout + svc.config.ack_step * targets.len() as u32,
        );
        let planned = targets.iter().chain(&remote).copied().collect();
        let mut w = Writer {
            block,
            win,
            remote,
            planned,
            pipe: None,
            buf: BytesMut::new(),
            buf_offset: 0,
            flushed_in_buf: 0,
            window_bytes,
            broken: false,
            setup_pending: params.setup_with_first_packet,
            sent_with_setup: false,
            ack_us: AckHistogram::new_with_bounds(1, 600_000_000, 3)
                .expect("valid histogram bounds"),
            params,
            ctx: shared.clone(),
            svc: svc.clone(),
        };
        if !w.setup_pending {
            w.establish(0).await?;
        }
        Ok(w)
    }

    /// The block.
    pub fn block(&self) -> BlockId {
        self.block
    }

    /// The current generation stamp.
    pub fn genstamp(&self) -> GenStamp {
        self.win.genstamp()
    }

    /// The current pipeline.
    pub fn targets(&self) -> Vec<NodeId> {
        self.win.targets().collect()
    }

    /// Bytes acknowledged by every node of the pipeline.
    pub fn acked_len(&self) -> u64 {
        self.win.acked_len()
    }

    /// Window of bytes in flight this writer uses.
    pub fn window_bytes(&self) -> usize {
        self.window_bytes
    }

    /// Packet ack latencies so far (µs).
    pub fn ack_latency(&self) -> &AckHistogram {
        &self.ack_us
    }

    fn name(&self, n: NodeId) -> String {
        self.ctx.name(n)
    }

    /// Appends data to the block. Returns once it is queued; whole packets are sent as
    /// they fill, waiting for acks when the window is full.
    pub async fn write(&mut self, mut data: Bytes) -> Result<(), WriteError> {
        if self.broken {
            return Err(WriteError::Failed { block: self.block });
        }
        if self.buf_offset + (self.buf.len() + data.len()) as u64 > crate::block::MAX_BLOCK_SIZE {
            return Err(WriteError::TooLarge { block: self.block });
        }
        let packet = self.packet_bytes();
        while !data.is_empty() {
            let take = (packet - self.buf.len().min(packet))
                .min(data.len())
                .max(if self.buf.len() >= packet { 0 } else { 1 });
            self.buf
                .extend_from_slice(&data.split_to(take.min(data.len())));
            if self.buf.len() >= packet {
                self.send_buffered(packet, PacketFlags::default()).await?;
            }
        }
        Ok(())
    }

    /// Whether packets may be compressed on DCI hops of this pipeline.
    /// The block's replica set as this write leaves it: the holders a copy adds to, the
    /// pipeline, and (async) the remote targets.
    fn replica_set(&self) -> Vec<NodeId> {
        let mut v = self.params.holders.clone();
        for t in self.win.targets().chain(self.remote.iter().copied()) {
            if !v.contains(&t) {
                v.push(t);
            }
        }
        v
    }

    /// Dropped nodes not made up for by a spare: per IDC, as many of its failed nodes as
    /// it has fewer replicas than the write started with.
    fn lost(&self) -> Vec<NodeId> {
        let topo = self.ctx.topology();
        let now = self.replica_set();
        let count =
            |set: &[NodeId], idc| set.iter().filter(|&&n| topo.location(n).idc == idc).count();
        let mut lost: Vec<NodeId> = Vec::new();
        for &f in self.win.failed() {
            let idc = topo.location(f).idc;
            if count(&self.planned, idc) > count(&now, idc) + count(&lost, idc) {
                lost.push(f);
            }
        }
        lost
    }

    fn compression(&self) -> Compression {
        self.ctx.dci.compression()
    }

    fn packet_bytes(&self) -> usize {
        let bpc = self.params.checksum.bytes_per_chunk() as usize;
        (self.svc.config.packet_bytes / bpc).max(1) * bpc
    }

    /// Sends the first `n` buffered bytes as one packet.
    async fn send_buffered(&mut self, n: usize, flags: PacketFlags) -> Result<(), WriteError> {
        let data = self.buf.split_to(n).freeze();
        let offset = self.buf_offset;
        self.buf_offset += n as u64;
        self.flushed_in_buf = 0;
        self.send_packet(offset, data, flags).await
    }

    async fn send_packet(
        &mut self,
        offset: u64,
        data: Bytes,
        flags: PacketFlags,
    ) -> Result<(), WriteError> {
        while !self.win.has_room(data.len()) {
            self.wait_ack().await?;
        }
        let crcs = self.params.checksum.checksums(&data);
        let packet = self.win.push(offset, data, crcs, flags, Instant::now());
        if self.setup_pending {
            // The first packet: it goes out behind the setup (and, the last one, with the
            // end of the stream). A setup that fails for good ends the write.
            let established = self.establish(0).await;
            if established.is_err() {
                self.broken = true;
            }
            return established;
        }
        let sent = self.send_frame(packet).await;
        if let Err(e) = sent {
            // The first hop is gone; recovery resends everything unacked.
            self.recover(0, &e).await?;
        } else if flags.last {
            // The last packet and the end of this side of the stream go out together.
            self.end_pipe().await?;
        } else {
            // Each packet goes out now: a link may hold what it is fed until a flush
            // (TLS over TCP does, to write a frame's head and payload together).
            self.flush_pipe().await?;
        }
        Ok(())
    }

    /// A packet for the first hop: governed (and maybe compressed) when it crosses the DCI.
    async fn governed(&self, packet: Packet) -> Frame {
        Frame::Packet(
            self.ctx
                .dci
                .govern_packet(
                    self.win.first(),
                    self.params.class,
                    self.params.provisioning == Provisioning::Spot,
                    self.compression(),
                    packet,
                    &self.ctx.metrics,
                )
                .await,
        )
    }

    /// Sends one packet to the first hop (governed when it crosses the DCI), unflushed.
    async fn send_frame(&mut self, packet: Packet) -> Result<(), String> {
        let frame = self.governed(packet).await;
        match self.pipe.as_mut() {
            Some(p) => p.sink.feed(&frame).await.map_err(|e| e.to_string()),
            None => Err("no pipeline".into()),
        }
    }

    async fn flush_pipe(&mut self) -> Result<(), WriteError> {
        let r = match self.pipe.as_mut() {
            Some(p) => p.sink.flush().await.map_err(|e| e.to_string()),
            None => Ok(()),
        };
        if let Err(e) = r {
            self.recover(0, &e).await?;
        }
        Ok(())
    }

    /// Flushes and ends the writer's side of the stream (after the last packet; acks
    /// still come back on the other side).
    async fn end_pipe(&mut self) -> Result<(), WriteError> {
        let r = match self.pipe.as_mut() {
            Some(p) => {
                p.ended = true;
                p.sink.finish().await.map_err(|e| e.to_string())
            }
            None => Ok(()),
        };
        if let Err(e) = r {
            self.recover(0, &e).await?;
        }
        Ok(())
    }

    /// Waits for the oldest unacked packet's ack (recovering on failure).
    async fn wait_ack(&mut self) -> Result<(), WriteError> {
        let deadline = self.win.poll_timeout();
        let msg = match (self.pipe.as_mut(), deadline) {
            (Some(p), Some(at)) => tokio::time::timeout_at(at.into(), p.acks.recv()).await,
            (Some(p), None) => Ok(p.acks.recv().await),
            (None, _) => Ok(Some(AckMsg::Broken("no pipeline".into()))),
        };
        let now = Instant::now();
        let fault = match msg {
            Ok(Some(AckMsg::Ack(a))) => match self.win.handle_ack(&a, now) {
                Ok(Some(acked)) => {
                    let us = acked.latency.as_micros().max(1) as u64;
                    let _ = self.ack_us.record(us);
                    self.ctx.metrics.pipeline_ack_us.record(acked.latency);
                    return Ok(());
                }
                Ok(None) => return Ok(()),
                Err(f) => f,
            },
            Ok(Some(AckMsg::Broken(why))) => return self.recover(0, &why).await,
            Ok(None) => return self.recover(0, "ack stream ended").await,
            Err(_) => match self.win.handle_timeout(now) {
                Some(f) => f,
                None => return Ok(()),
            },
        };
        let why = match &fault {
            AckFault::Refused { index, status } => {
                let node = self.win.targets().nth(*index).map(|n| self.name(n));
                format!("{status:?} at {}", node.unwrap_or_default())
            }
            other => other.to_string(),
        };
        self.recover(fault.index(), &why).await
    }

    /// Sets up the pipeline to `self.targets`, resuming at `offset`. On a refusal from a
    /// node, drops it and tries again with the rest.
    async fn establish(&mut self, offset: u64) -> Result<(), WriteError> {
        let mut admission = self.admission();
        loop {
            // A node a reload removed since the pipeline was planned fails as a dead one.
            if let Some(index) = self.removed_target() {
                self.drop_target(index, REMOVED)?;
                if offset > 0 || !self.win.failed().is_empty() {
                    self.win.bump_genstamp();
                }
                continue;
            }
            // A first setup creates the replicas (a retry after a refusal too: the refused
            // attempt's replicas were removed); a recovery resumes them, and so does a
            // retry after a setup that carried packets: a first hop that failed after
            // passing them on leaves replicas below it, even final ones (a hop without
            // the replica creates it on a resume at offset 0).
            let resume = offset > 0 || self.sent_with_setup;
            match self.try_establish(offset, resume).await {
                Ok(p) => {
                    self.pipe = Some(p);
                    self.setup_pending = false;
                    return Ok(());
                }
                Err(SetupFailure {
                    index,
                    status: Some(Status::Exists),
                    why,
                }) if offset == 0 => {
                    // The block id is in use there: the caller's mistake, not a failed
                    // node. Going on without that node would silently lose a replica.
                    self.broken = true;
                    let node = self.win.targets().nth(index).unwrap_or(self.win.first());
                    return Err(WriteError::BlockExists {
                        block: self.block,
                        node: self.name(node),
                        reason: why,
                    });
                }
                Err(SetupFailure {
                    index,
                    status: Some(Status::Busy),
                    ..
                }) => self.wait_for_admission(&mut admission, index).await?,
                Err(SetupFailure {
                    index,
                    status: Some(Status::Denied),
                    why,
                }) => return Err(self.denied(index, why)),
                // A removed node's word on its downstream is not taken: peers that
                // reloaded refuse it, so it blames healthy nodes. It goes instead (at
                // the top of the loop).
                Err(_) if self.removed_target().is_some() => {}
                Err(SetupFailure { index, why, .. }) => {
                    self.drop_target(index, &why)?;
                    if offset > 0 || !self.win.failed().is_empty() {
                        self.win.bump_genstamp();
                    }
                }
            }
        }
    }

    /// The first target a topology reload removed, if any.
    fn removed_target(&self) -> Option<usize> {
        let topo = self.ctx.topology();
        self.win.targets().position(|t| !topo.contains(t))
    }

    /// `targets[index]` refused the setup: the peer's certificate does not allow it. The
    /// write ends; dropping the node would not make it allowed.
    fn denied(&mut self, index: usize, why: String) -> WriteError {
        self.broken = true;
        let node = self.win.targets().nth(index).unwrap_or(self.win.first());
        WriteError::Denied {
            block: self.block,
            node: self.name(node),
            reason: why,
        }
    }

    /// Gang admission of this write's pipeline setups, from now until the admission
    /// timeout.
    fn admission(&self) -> crate::scheduler::gang::Admission {
        crate::scheduler::gang::Admission::new(
            std::time::Instant::now() + self.svc.config.admission_timeout,
            std::time::Duration::from_millis(5),
            std::time::Duration::from_millis(500),
            self.block.0 ^ self.win.genstamp().0.rotate_left(17),
        )
    }

    /// A setup was refused by `targets[index]` for want of a write slot. All or nothing:
    /// the refused setup released every slot it held and removed its new replicas; waits
    /// to try the same pipeline again, or fails once the admission deadline would pass.
    async fn wait_for_admission(
        &mut self,
        admission: &mut crate::scheduler::gang::Admission,
        index: usize,
    ) -> Result<(), WriteError> {
        let node = self.win.targets().nth(index).unwrap_or(self.win.first());
        match admission.handle_refusal(std::time::Instant::now()) {
            Some(at) => {
                tokio::time::sleep_until(at.into()).await;
                Ok(())
            }
            None => {
                self.broken = true;
                Err(WriteError::Busy {
                    block: self.block,
                    node: self.name(node),
                    waited: self.svc.config.admission_timeout,
                    attempts: admission.refusals(),
                })
            }
        }
    }

    /// Drops `targets[index]`; errors when an IDC of the write has no replica left, or
    /// when this write does not recover at all.
    fn drop_target(&mut self, index: usize, why: &str) -> Result<NodeId, WriteError> {
        let node = self.win.targets().nth(index).unwrap_or(self.win.first());
        if !self.params.recover {
            self.broken = true;
            return Err(WriteError::NodeFailed {
                block: self.block,
                node: self.name(node),
                reason: why.to_string(),
            });
        }
        tracing::warn!(block = %self.block, node = %self.name(node), reason = why, "dropping node from pipeline");
        self.win.drop_target(index).map_err(|IdcLost { idc }| {
            self.broken = true;
            WriteError::IdcLost {
                block: self.block,
                idc: self.ctx.topology().idc(idc).name.clone(),
                failed: self.win.failed().iter().map(|&f| self.name(f)).collect(),
            }
        })
    }

    /// Opens the first hop and sends the `WriteBlock` (a first setup of a writer with
    /// [`WriteParams::setup_with_first_packet`]: with the packets waiting for it); on
    /// failure, says which node failed setup, and why.
    async fn try_establish(&mut self, offset: u64, resume: bool) -> Result<Pipe, SetupFailure> {
        let first = self.win.first();
        let req = WriteBlock {
            block: self.block,
            genstamp: self.win.genstamp(),
            offset,
            targets: self.win.targets().skip(1).map(|t| self.name(t)).collect(),
            mode: self.params.mode,
            class: self.params.class,
            spot: self.params.provisioning == Provisioning::Spot,
            checksum: self.params.checksum,
            compression: self.compression(),
            // Async: the head queues the remote copy once the block is final locally.
            remote_targets: self.remote.iter().map(|&t| self.name(t)).collect(),
            // Set by the head from this node's certificate when it is a client.
            origin: None,
            resume,
            replicas: self.replica_set().iter().map(|&t| self.name(t)).collect(),
            lost: self.lost().iter().map(|&t| self.name(t)).collect(),
        };
        // The packets waiting for the setup (a first setup with
        // `setup_with_first_packet`), renumbered from 0 (a retry after a refusal sends
        // them again) and admitted by the DCI governor before the clock of the setup runs.
        let mut waiting = Vec::new();
        if self.setup_pending {
            for packet in self.win.renumber(Instant::now()) {
                waiting.push(self.governed(packet).await);
            }
        }
        let timeout = self.svc.config.setup_timeout;
        let mut s = tokio::time::timeout(timeout, open_hop(&self.svc, first))
            .await
            .map_err(|_| (0, format!("setup timed out after {timeout:?}")))?
            .map_err(|e| (0, e.to_string()))?;
        self.sent_with_setup |= !waiting.is_empty();
        let sent = tokio::time::timeout(timeout, send_setup(&mut s, req, waiting))
            .await
            .unwrap_or_else(|_| Err(format!("setup timed out after {timeout:?}")));
        let answer = tokio::time::timeout(timeout, setup_answer(&mut s.reader)).await;
        let (statuses, ended) = match (sent, answer) {
            (Ok(ended), Ok(Ok(st))) => (st, ended),
            // A hop that refuses ends the stream without reading what came with the
            // setup, so the packets may fail to go out: its answer still says why.
            (Err(_), Ok(Ok(st))) if st.iter().any(|s| *s != Status::Success) => (st, true),
            (Err(e), _) => return Err((0, e).into()),
            (Ok(_), Ok(Err(e))) => return Err(e.into()),
            (Ok(_), Err(_)) => {
                return Err((0, format!("setup ack timed out after {timeout:?}")).into());
            }
        };
        if let Some(i) = statuses.iter().position(|s| *s != Status::Success) {
            return Err(SetupFailure {
                index: i,
                status: Some(statuses[i]),
                why: format!("setup refused: {:?}", statuses[i]),
            });
        }
        if statuses.len() < self.win.targets().len() {
            return Err((statuses.len(), "setup ack misses statuses".into()).into());
        }
        let (tx, rx) = mpsc::channel(wire::MAX_PACKET_CHUNKS.min(self.window_bytes / 512 + 16));
        let Stream {
            mut reader, writer, ..
        } = s;
        let task = tokio::spawn(async move {
            loop {
                let msg = match reader.recv().await {
                    Ok(Some(Frame::Ack(a))) => AckMsg::Ack(a),
                    Ok(Some(Frame::Error(e))) => {
                        AckMsg::Broken(format!("{:?}: {}", e.status, e.message))
                    }
                    Ok(Some(_)) => AckMsg::Broken("unexpected frame on ack stream".into()),
                    Ok(None) => AckMsg::Broken("pipeline closed the stream".into()),
                    Err(e) => AckMsg::Broken(e.to_string()),
                };
                let end = matches!(msg, AckMsg::Broken(_));
                if tx.send(msg).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Pipe {
            sink: writer,
            ended,
            acks: rx,
            reader: task,
        })
    }

    /// Drops `targets[index]` (or the node a broken stream points to), brings in a spare
    /// from the same IDC when one is available (a survivor copies it the acknowledged
    /// prefix first), bumps the generation stamp, rebuilds the pipeline and resends what
    /// was not acknowledged.
    async fn recover(&mut self, index: usize, why: &str) -> Result<(), WriteError> {
        self.pipe = None;
        // A node a reload removed goes first, whoever was blamed (see `establish`).
        let (index, why) = match self.removed_target() {
            Some(i) => (i, REMOVED),
            None => (index, why),
        };
        let failed = self.drop_target(index, why)?;
        let mut to_replace = vec![(index, failed)];
        let mut admission = self.admission();
        loop {
            let resume = self.win.resume_offset();
            for (at, failed) in std::mem::take(&mut to_replace) {
                self.try_replace(at, failed, resume).await;
            }
            self.win.bump_genstamp();
            match self.try_establish(resume, true).await {
                Err(SetupFailure {
                    index,
                    status: Some(Status::Busy),
                    ..
                }) => self.wait_for_admission(&mut admission, index).await?,
                Err(SetupFailure {
                    index,
                    status: Some(Status::Denied),
                    why,
                }) => return Err(self.denied(index, why)),
                Err(SetupFailure { index: i, why, .. }) => {
                    let (i, why) = match self.removed_target() {
                        Some(r) => (r, REMOVED.to_string()),
                        None => (i, why),
                    };
                    let f = self.drop_target(i, &why)?;
                    to_replace.push((i, f));
                    continue;
                }
                Ok(p) => self.pipe = Some(p),
            }
            // Resend everything unacknowledged, renumbered from 0 on the new pipeline.
            let mut ok = true;
            for packet in self.win.renumber(Instant::now()) {
                if self.send_frame(packet).await.is_err() {
                    ok = false;
                    break;
                }
            }
            if ok && let Some(pipe) = self.pipe.as_mut() {
                ok = pipe.sink.flush().await.is_ok();
            }
            if !ok {
                self.pipe = None;
                self.drop_target(0, "first hop failed while resending")?;
                continue;
            }
            self.ctx.emit(NodeEvent::UnderReplicated {
                block: self.block,
                genstamp: self.win.genstamp(),
                replicas: self.targets(),
                failed: self.win.failed().to_vec(),
            });
            tracing::info!(block = %self.block, genstamp = %self.win.genstamp(), survivors = self.win.targets().len(), resume, "pipeline recovered");
            return Ok(());
        }
    }

    /// Puts a spare from `failed`'s IDC at position `at`, after a survivor has copied it
    /// the first `resume` bytes. Without a usable spare the pipeline goes on without one.
    async fn try_replace(&mut self, at: usize, failed: NodeId, resume: u64) {
        let topo = self.ctx.topology();
        let idc = topo.location(failed).idc;
        let Some(pos) = self.params.spares.iter().position(|&s| {
            topo.location(s).idc == idc && !self.win.contains(s) && !self.win.failed().contains(&s)
        }) else {
            return;
        };
        let spare = self.params.spares.remove(pos);
        if resume > 0 {
            // The survivor nearest the spare (its rack switch first) sends the prefix.
            let survivors: Vec<NodeId> = self
                .win
                .targets()
                .filter(|&t| topo.location(t).idc == idc)
                .collect();
            let source = crate::scheduler::route::choose_source(
                &topo,
                &survivors,
                spare,
                &crate::scheduler::route::SourceLoad::default(),
            )
            .unwrap_or(self.win.first());
            let req = crate::wire::CopyBlock {
                block: self.block,
                genstamp: self.win.genstamp(),
                len: resume,
                targets: vec![self.name(spare)],
                class: TrafficClass::Repair,
                replicas: Vec::new(),
            };
            let timeout = self.svc.config.ack_timeout;
            let copied =
                tokio::time::timeout(timeout, copy::ask_copy(&self.svc, source, req)).await;
            if let Err(why) =
                copied.unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
            {
                tracing::warn!(block = %self.block, spare = %self.name(spare), reason = why, "replacement failed");
                self.win.mark_failed(spare);
                return;
            }
        }
        tracing::info!(block = %self.block, spare = %self.name(spare), replaces = %self.name(failed), resume, "replacement joins the pipeline");
        self.win.insert_target(at, spare, idc);
    }

    async fn drain_acks(&mut self) -> Result<(), WriteError> {
        while self.win.in_flight() > 0 {
            self.wait_ack().await?;
        }
        Ok(())
    }

    /// Sends everything buffered (a partial last chunk included) and waits until every
    /// node of the pipeline has acknowledged it. Data is then in every replica's OS.
    pub async fn hflush(&mut self) -> Result<(), WriteError> {
        self.flush_buffer(false).await
    }

    /// Like [`hflush`](Self::hflush), and every replica fdatasyncs it before acking.
    pub async fn hsync(&mut self) -> Result<(), WriteError> {
        self.flush_buffer(true).await
    }

    async fn flush_buffer(&mut self, sync: bool) -> Result<(), WriteError> {
        if self.broken {
            return Err(WriteError::Failed { block: self.block });
        }
        let bpc = self.params.checksum.bytes_per_chunk() as usize;
        if self.buf.len() > self.flushed_in_buf || sync {
            let whole = self.buf.len() / bpc * bpc;
            if whole > 0 {
                self.send_buffered(
                    whole,
                    PacketFlags {
                        sync,
                        ..Default::default()
                    },
                )
                .await?;
            }
            if !self.buf.is_empty() {
                // The partial chunk goes out now and again, longer, with the next packet.
                let data = Bytes::copy_from_slice(&self.buf);
                self.flushed_in_buf = self.buf.len();
                self.send_packet(
                    self.buf_offset,
                    data,
                    PacketFlags {
                        sync,
                        ..Default::default()
                    },
                )
                .await?;
            } else if sync && whole == 0 {
                self.send_packet(
                    self.buf_offset,
                    Bytes::new(),
                    PacketFlags {
                        sync,
                        ..Default::default()
                    },
                )
                .await?;
            }
        }
        self.drain_acks().await
    }

    /// Sends the rest, finalizes the replica on every node of the pipeline (durable) and
    /// returns the committed length and the nodes that hold it.
    pub async fn close(mut self) -> Result<WriteOutcome, WriteError> {
        if self.broken {
            return Err(WriteError::Failed { block: self.block });
        }
        let data = self.buf.split().freeze();
        let offset = self.buf_offset;
        self.buf_offset += data.len() as u64;
        let len = self.buf_offset;
        self.send_packet(
            offset,
            data,
            PacketFlags {
                last: true,
                ..Default::default()
            },
        )
        .await?;
        self.drain_acks().await?;
        if let Some(mut p) = self.pipe.take().filter(|p| !p.ended) {
            let _ = p.sink.finish().await;
        }
        Ok(WriteOutcome {
            block: self.block,
            genstamp: self.win.genstamp(),
            len,
            replicas: self.targets(),
            failed: self.win.failed().to_vec(),
            queued_remote: self.remote.clone(),
        })
    }
}

/// Sends a `WriteBlock` and the packets waiting for it in one write, the last packet with
/// the end of the stream; returns whether the stream's sending half was ended.
async fn send_setup(s: &mut Stream, req: WriteBlock, waiting: Vec<Frame>) -> Result<bool, String> {
    let broken = |e: crate::transport::FramedError| e.to_string();
    s.writer
        .feed(&Frame::WriteBlock(req))
        .await
        .map_err(broken)?;
    let mut ended = false;
    for frame in waiting {
        ended |= matches!(&frame, Frame::Packet(p) if p.flags.last);
        s.writer.feed(&frame).await.map_err(broken)?;
    }
    if ended {
        s.writer.finish().await.map_err(broken)?;
    } else {
        s.writer.flush().await.map_err(broken)?;
    }
    Ok(ended)
}
