//! The writer side of a pipeline: [`Writer`] streams one block through the targets,
//! keeps a window of packets in flight, and recovers when a node fails.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::{
    Pipelines, SetupFailure, WriteError, WriteOutcome, WriteParams, copy, open_hop, setup_exchange,
    window_for,
};
use crate::block::{BlockId, GenStamp};
use crate::context::{NodeContext, NodeEvent};
use crate::topology::{IdcId, NodeId};
use crate::transport::{FrameWriter, Sink, Stream};
use crate::wire::{
    self, Ack, Compression, Frame, Packet, PacketFlags, Status, TrafficClass, WriteBlock, WriteMode,
};

enum AckMsg {
    Ack(Ack),
    Broken(String),
}

struct Pipe {
    sink: FrameWriter<Sink>,
    acks: mpsc::Receiver<AckMsg>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

struct Unacked {
    seq: u64,
    offset: u64,
    flags: PacketFlags,
    data: Bytes,
    crcs: Vec<u32>,
    sent: Instant,
}

/// Latency of packet acks, in microseconds.
pub type AckHistogram = hdrhistogram::Histogram<u64>;

/// Streams one block through a pipeline of nodes. See the [module docs](self).
pub struct Writer {
    ctx: Arc<NodeContext>,
    svc: Arc<Pipelines>,
    block: BlockId,
    genstamp: GenStamp,
    params: WriteParams,
    /// Current pipeline, in order.
    targets: Vec<NodeId>,
    /// Async mode: targets left to background replication.
    remote: Vec<NodeId>,
    /// IDCs the write started in (each must keep a replica).
    idcs: Vec<IdcId>,
    failed: Vec<NodeId>,
    pipe: Option<Pipe>,
    window: usize,
    unacked: VecDeque<Unacked>,
    unacked_bytes: usize,
    next_seq: u64,
    acked_len: u64,
    /// Bytes not yet sent; starts at `buf_offset` (a chunk boundary).
    buf: BytesMut,
    buf_offset: u64,
    /// Bytes of `buf` already sent by an hflush (the partial chunk is resent later).
    flushed_in_buf: usize,
    broken: bool,
    ack_us: AckHistogram,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("block", &self.block)
            .field("genstamp", &self.genstamp)
            .field("targets", &self.targets)
            .field("acked_len", &self.acked_len)
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
        let topo = &shared.topology;
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
        let targets = &targets[..];
        let mut idcs: Vec<IdcId> = targets.iter().map(|&t| topo.location(t).idc).collect();
        idcs.dedup();
        let window = window_for(svc, shared.me, targets);
        let mut w = Writer {
            block,
            genstamp: params.genstamp,
            targets: targets.to_vec(),
            remote,
            idcs,
            failed: Vec::new(),
            pipe: None,
            window,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            next_seq: 0,
            acked_len: 0,
            buf: BytesMut::new(),
            buf_offset: 0,
            flushed_in_buf: 0,
            broken: false,
            ack_us: AckHistogram::new_with_bounds(1, 600_000_000, 3)
                .expect("valid histogram bounds"),
            params,
            ctx: shared.clone(),
            svc: svc.clone(),
        };
        w.establish(0).await?;
        Ok(w)
    }

    /// The block.
    pub fn block(&self) -> BlockId {
        self.block
    }

    /// The current generation stamp.
    pub fn genstamp(&self) -> GenStamp {
        self.genstamp
    }

    /// The current pipeline.
    pub fn targets(&self) -> &[NodeId] {
        &self.targets
    }

    /// Bytes acknowledged by every node of the pipeline.
    pub fn acked_len(&self) -> u64 {
        self.acked_len
    }

    /// Window of bytes in flight this writer uses.
    pub fn window_bytes(&self) -> usize {
        self.window
    }

    /// Packet ack latencies so far (µs).
    pub fn ack_latency(&self) -> &AckHistogram {
        &self.ack_us
    }

    fn name(&self, n: NodeId) -> String {
        self.ctx.name(n).to_string()
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
        while self.unacked_bytes + data.len() > self.window && !self.unacked.is_empty() {
            self.wait_ack().await?;
        }
        let crcs = self.params.checksum.checksums(&data);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unacked_bytes += data.len();
        self.unacked.push_back(Unacked {
            seq,
            offset,
            flags,
            data: data.clone(),
            crcs: crcs.clone(),
            sent: Instant::now(),
        });
        let packet = Packet {
            seq,
            offset,
            flags,
            data_len: data.len() as u32,
            crcs,
            payload: data,
        };
        let first = self.targets[0];
        let frame = Frame::Packet(
            self.ctx
                .dci
                .govern_packet(
                    first,
                    self.params.class,
                    self.compression(),
                    packet,
                    &self.ctx.metrics,
                )
                .await,
        );
        let sent = match self.pipe.as_mut() {
            Some(p) => p.sink.feed(&frame).await.map_err(|e| e.to_string()),
            None => Err("no pipeline".into()),
        };
        if let Err(e) = sent {
            // The first hop is gone; recovery resends everything unacked.
            self.recover(0, &e).await?;
        } else if flags.last || flags.sync || self.unacked.len() == 1 {
            self.flush_pipe().await?;
        }
        Ok(())
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

    /// Waits for the oldest unacked packet's ack (recovering on failure).
    async fn wait_ack(&mut self) -> Result<(), WriteError> {
        let timeout = self.svc.config.ack_timeout;
        let msg = match self.pipe.as_mut() {
            Some(p) => match tokio::time::timeout(timeout, p.acks.recv()).await {
                Ok(Some(m)) => m,
                Ok(None) => AckMsg::Broken("ack stream ended".into()),
                Err(_) => AckMsg::Broken(format!("no ack within {timeout:?}")),
            },
            None => AckMsg::Broken("no pipeline".into()),
        };
        match msg {
            AckMsg::Ack(a) => {
                let Some(front) = self.unacked.front() else {
                    return Ok(());
                };
                if a.seq != front.seq {
                    return self
                        .recover(
                            0,
                            &format!("ack for {} while waiting for {}", a.seq, front.seq),
                        )
                        .await;
                }
                match a.statuses.iter().position(|s| *s != Status::Success) {
                    None if a.statuses.len() >= self.targets.len() => {
                        let p = self.unacked.pop_front().expect("front exists");
                        self.unacked_bytes -= p.data.len();
                        self.acked_len = self.acked_len.max(p.offset + p.data.len() as u64);
                        let _ = self
                            .ack_us
                            .record(p.sent.elapsed().as_micros().max(1) as u64);
                        self.ctx.metrics.pipeline_ack_us.record(p.sent.elapsed());
                        Ok(())
                    }
                    None => self.recover(a.statuses.len(), "ack misses statuses").await,
                    Some(i) => {
                        let why = format!("{:?} at {}", a.statuses[i], self.name(self.targets[i]));
                        self.recover(i, &why).await
                    }
                }
            }
            AckMsg::Broken(why) => self.recover(0, &why).await,
        }
    }

    /// Sets up the pipeline to `self.targets`, resuming at `offset`. On a refusal from a
    /// node, drops it and tries again with the rest.
    async fn establish(&mut self, offset: u64) -> Result<(), WriteError> {
        loop {
            match self.try_establish(offset).await {
                Ok(p) => {
                    self.pipe = Some(p);
                    return Ok(());
                }
                Err(SetupFailure {
                    index,
                    exists: true,
                    why,
                }) if offset == 0 => {
                    // The block id is in use there: the caller's mistake, not a failed
                    // node. Going on without that node would silently lose a replica.
                    self.broken = true;
                    let index = index.min(self.targets.len().saturating_sub(1));
                    return Err(WriteError::BlockExists {
                        block: self.block,
                        node: self.name(self.targets[index]),
                        reason: why,
                    });
                }
                Err(SetupFailure { index, why, .. }) => {
                    self.drop_target(index, &why)?;
                    if offset > 0 || !self.failed.is_empty() {
                        self.genstamp = GenStamp(self.genstamp.0 + 1);
                    }
                }
            }
        }
    }

    /// Marks `targets[index]` failed; errors when an IDC has no replica left.
    fn drop_target(&mut self, index: usize, why: &str) -> Result<NodeId, WriteError> {
        let index = index.min(self.targets.len().saturating_sub(1));
        let failed = self.targets.remove(index);
        tracing::warn!(block = %self.block, node = %self.name(failed), reason = why, "dropping node from pipeline");
        self.failed.push(failed);
        let topo = &self.ctx.topology;
        for &idc in &self.idcs {
            if !self.targets.iter().any(|&t| topo.location(t).idc == idc) {
                self.broken = true;
                return Err(WriteError::IdcLost {
                    block: self.block,
                    idc: topo.idc(idc).name.clone(),
                    failed: self.failed.iter().map(|&f| self.name(f)).collect(),
                });
            }
        }
        Ok(failed)
    }

    /// Opens the first hop and sends the `WriteBlock`; on failure, says which node failed
    /// setup, and why.
    async fn try_establish(&mut self, offset: u64) -> Result<Pipe, SetupFailure> {
        let first = self.targets[0];
        let req = WriteBlock {
            block: self.block,
            genstamp: self.genstamp,
            offset,
            targets: self.targets[1..].iter().map(|&t| self.name(t)).collect(),
            mode: self.params.mode,
            class: self.params.class,
            checksum: self.params.checksum,
            compression: self.compression(),
            // Async: the head queues the remote copy once the block is final locally.
            remote_targets: self.remote.iter().map(|&t| self.name(t)).collect(),
        };
        let timeout = self.svc.config.setup_timeout;
        let mut s = tokio::time::timeout(timeout, open_hop(&self.svc, first))
            .await
            .map_err(|_| (0, format!("setup timed out after {timeout:?}")))?
            .map_err(|e| (0, e.to_string()))?;
        let statuses = tokio::time::timeout(timeout, setup_exchange(&mut s, req))
            .await
            .map_err(|_| (0, format!("setup ack timed out after {timeout:?}")))??;
        if let Some(i) = statuses.iter().position(|s| *s != Status::Success) {
            return Err(SetupFailure {
                index: i,
                exists: statuses[i] == Status::Exists,
                why: format!("setup refused: {:?}", statuses[i]),
            });
        }
        if statuses.len() < self.targets.len() {
            return Err((statuses.len(), "setup ack misses statuses".into()).into());
        }
        let (tx, rx) = mpsc::channel(wire::MAX_PACKET_CHUNKS.min(self.window / 512 + 16));
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
        let failed = self.drop_target(index, why)?;
        let mut to_replace = vec![(index, failed)];
        loop {
            let resume = self
                .unacked
                .front()
                .map_or(self.acked_len.min(self.buf_offset), |p| {
                    p.offset.min(self.acked_len)
                });
            for (at, failed) in std::mem::take(&mut to_replace) {
                self.try_replace(at, failed, resume).await;
            }
            self.genstamp = GenStamp(self.genstamp.0 + 1);
            match self.try_establish(resume).await {
                Err(SetupFailure { index: i, why, .. }) => {
                    let f = self.drop_target(i, &why)?;
                    to_replace.push((i, f));
                    continue;
                }
                Ok(p) => self.pipe = Some(p),
            }
            // Resend everything unacknowledged, renumbered from 0 on the new pipeline.
            let pending: Vec<Unacked> = self.unacked.drain(..).collect();
            self.unacked_bytes = 0;
            self.next_seq = 0;
            let mut ok = true;
            for p in pending {
                let seq = self.next_seq;
                self.next_seq += 1;
                let packet = Packet {
                    seq,
                    offset: p.offset,
                    flags: p.flags,
                    data_len: p.data.len() as u32,
                    crcs: p.crcs.clone(),
                    payload: p.data.clone(),
                };
                let first = self.targets[0];
                let frame = Frame::Packet(
                    self.ctx
                        .dci
                        .govern_packet(
                            first,
                            self.params.class,
                            self.compression(),
                            packet,
                            &self.ctx.metrics,
                        )
                        .await,
                );
                self.unacked_bytes += p.data.len();
                self.unacked.push_back(Unacked {
                    seq,
                    sent: Instant::now(),
                    ..p
                });
                let r = match self.pipe.as_mut() {
                    Some(pipe) => pipe.sink.feed(&frame).await,
                    None => Ok(()),
                };
                if r.is_err() {
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
                genstamp: self.genstamp,
                replicas: self.targets.clone(),
                failed: self.failed.clone(),
            });
            tracing::info!(block = %self.block, genstamp = %self.genstamp, survivors = self.targets.len(), resume, "pipeline recovered");
            return Ok(());
        }
    }

    /// Puts a spare from `failed`'s IDC at position `at`, after a survivor has copied it
    /// the first `resume` bytes. Without a usable spare the pipeline goes on without one.
    async fn try_replace(&mut self, at: usize, failed: NodeId, resume: u64) {
        let topo = self.ctx.topology.clone();
        let idc = topo.location(failed).idc;
        let Some(pos) = self.params.spares.iter().position(|&s| {
            topo.location(s).idc == idc && !self.targets.contains(&s) && !self.failed.contains(&s)
        }) else {
            return;
        };
        let spare = self.params.spares.remove(pos);
        if resume > 0 {
            let source = self
                .targets
                .iter()
                .copied()
                .find(|&t| topo.location(t).idc == idc)
                .or_else(|| self.targets.first().copied());
            let Some(source) = source else { return };
            let req = crate::wire::CopyBlock {
                block: self.block,
                genstamp: self.genstamp,
                len: resume,
                targets: vec![self.name(spare)],
                class: TrafficClass::Repair,
            };
            let timeout = self.svc.config.ack_timeout;
            let copied =
                tokio::time::timeout(timeout, copy::ask_copy(&self.svc, source, req)).await;
            if let Err(why) =
                copied.unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
            {
                tracing::warn!(block = %self.block, spare = %self.name(spare), reason = why, "replacement failed");
                self.failed.push(spare);
                return;
            }
        }
        tracing::info!(block = %self.block, spare = %self.name(spare), replaces = %self.name(failed), resume, "replacement joins the pipeline");
        self.targets.insert(at.min(self.targets.len()), spare);
    }

    async fn drain_acks(&mut self) -> Result<(), WriteError> {
        while !self.unacked.is_empty() {
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
        if let Some(mut p) = self.pipe.take() {
            let _ = p.sink.finish().await;
        }
        Ok(WriteOutcome {
            block: self.block,
            genstamp: self.genstamp,
            len,
            replicas: self.targets.clone(),
            failed: self.failed.clone(),
            queued_remote: self.remote.clone(),
        })
    }
}
