//! Reads from the closest healthy replica.
//!
//! A [`Reader`] orders a block's replicas with
//! [`crate::placement::sort_by_distance`]: the reader's own
//! node (read straight from the local store, no network), its rack, its IDC, then the
//! other IDC. Every chunk is verified end to end. A checksum mismatch, a missing replica,
//! a genstamp mismatch or a dead node moves on to the next replica, and a corrupt replica
//! is reported as a `NodeEvent::CorruptReplica`. A read slower
//! than the hedge threshold is started again on another replica in the same IDC, and the
//! first answer wins. The other IDC is asked only when no replica in the reader's IDC can
//! serve. Bytes read are counted per distance tier in
//! [`NodeMetrics::read_bytes`](crate::metrics::NodeMetrics::read_bytes).
//!
//! When no replica can serve, [`ReadError::NoReplica`] lists each replica tried with a
//! typed [`ReplicaFailure`]. This module also holds the read service a node runs for its
//! peers (`serve`).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rand::SeedableRng;

use crate::block::{BlockId, ChecksumSpec, GenStamp, MAX_BLOCK_SIZE};
use crate::context::{NodeContext, NodeEvent};
use crate::placement;
use crate::store::StoreError;
use crate::topology::{NodeId, Origin};
use crate::transport::Stream;
use crate::wire::{
    Compression, ErrorFrame, Frame, Packet, PacketFlags, ReadBlock, ReadResponse, Status,
    TrafficClass,
};

/// Data bytes per packet the read service sends (whole chunks).
const SERVE_PACKET_BYTES: u64 = 256 << 10;

/// Per-reader options.
#[derive(Debug, Clone)]
pub struct ReadParams {
    /// Start the same read on another replica in the same IDC when the first has not
    /// answered after this long, plus the time the range takes at `hedge_rate`; `None`
    /// disables hedging.
    pub hedge_after: Option<Duration>,
    /// Bytes per second below which a replica streaming a range counts as slow: a read
    /// of `len` bytes is hedged after `hedge_after + len / hedge_rate`. Default 100 MB/s,
    /// a tenth of what a healthy local replica streams here; a large range is otherwise
    /// read twice whenever it takes longer than a small one.
    pub hedge_rate: u64,
    /// Limit for one replica to answer a read.
    pub replica_timeout: Duration,
}

impl Default for ReadParams {
    fn default() -> Self {
        ReadParams {
            hedge_after: Some(Duration::from_millis(50)),
            hedge_rate: 100_000_000,
            replica_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a read failed on every replica.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// No replica could serve; each node tried, with why.
    #[error("{block}: no replica could serve the read: {}", .tried.iter().map(|(n, w)| format!("{n}: {w}")).collect::<Vec<_>>().join("; "))]
    NoReplica {
        /// The block.
        block: BlockId,
        /// Nodes tried, with the reason each failed.
        tried: Vec<(String, ReplicaFailure)>,
    },
    /// The range is outside the block.
    #[error("{block}: range {offset}+{len} outside the block ({block_len} bytes)")]
    OutOfRange {
        /// The block.
        block: BlockId,
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// The block's length.
        block_len: u64,
    },
}

/// Why one replica could not serve a read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaFailure {
    /// The node holds the block at another generation stamp (`found`, when it says).
    #[error("replica is at another generation stamp{}", .found.map(|g| format!(" ({g})")).unwrap_or_default())]
    Stale {
        /// The generation stamp found there.
        found: Option<GenStamp>,
    },
    /// The node holds no replica of the block.
    #[error("no replica there")]
    Missing,
    /// The replica failed verification; it is reported and quarantined where it lives.
    #[error("corrupt: {0}")]
    Corrupt(String),
    /// The range starts or ends beyond the replica.
    #[error("range beyond the replica ({replica_len} bytes)")]
    OutOfRange {
        /// The replica's length.
        replica_len: u64,
    },
    /// The peer refused with a status.
    #[error("peer answered {status:?}{}", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    Peer {
        /// Its status.
        status: Status,
        /// What it said.
        message: String,
    },
    /// The link to the peer failed: connect, stream, or a frame out of protocol.
    #[error("link: {0}")]
    Link(String),
    /// The local disk failed.
    #[error("local disk: {0}")]
    Disk(String),
    /// No answer within the replica timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

impl From<StoreError> for ReplicaFailure {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { .. } => ReplicaFailure::Missing,
            StoreError::GenStampMismatch { found, .. } => {
                ReplicaFailure::Stale { found: Some(found) }
            }
            StoreError::ChecksumMismatch { .. } | StoreError::Corrupt { .. } => {
                ReplicaFailure::Corrupt(e.to_string())
            }
            StoreError::OutOfRange { replica_len, .. } => {
                ReplicaFailure::OutOfRange { replica_len }
            }
            other => ReplicaFailure::Disk(other.to_string()),
        }
    }
}

impl ReplicaFailure {
    /// What a peer's answer status means for this replica.
    fn from_peer(status: Status, message: String) -> Self {
        match status {
            Status::NotFound => ReplicaFailure::Missing,
            Status::Stale => ReplicaFailure::Stale { found: None },
            Status::Corrupt => ReplicaFailure::Corrupt(if message.is_empty() {
                "peer reports the replica corrupt".into()
            } else {
                message
            }),
            status => ReplicaFailure::Peer { status, message },
        }
    }
}

/// Reads one block from its replicas. See the [module docs](self).
pub struct Reader {
    shared: Arc<NodeContext>,
    block: BlockId,
    genstamp: GenStamp,
    order: Vec<NodeId>,
    params: ReadParams,
    /// The replica length a replica reported (0 until one did): sizes the hedge delay of
    /// a read "to the end".
    learned_len: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("block", &self.block)
            .field("genstamp", &self.genstamp)
            .field("order", &self.order)
            .finish()
    }
}

impl Reader {
    /// Prepares reads of `block` at `genstamp` from `replicas`, for the node of `ctx`
    /// (the public way in is `Node::reader`).
    pub(crate) fn open(
        ctx: Arc<NodeContext>,
        block: BlockId,
        genstamp: GenStamp,
        replicas: &[NodeId],
        params: ReadParams,
    ) -> Reader {
        let shared = ctx;
        let origin = Origin::node(shared.topology().location(shared.me));
        let mut rng = rand::rngs::StdRng::seed_from_u64(block.0 ^ shared.me.index() as u64);
        let valid: Vec<NodeId> = replicas
            .iter()
            .copied()
            .filter(|&r| shared.topology().contains(r))
            .collect();
        let order = placement::sort_by_distance(&shared.topology(), &origin, &valid, &mut rng);
        Reader {
            shared,
            block,
            genstamp,
            order,
            params,
            learned_len: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Replicas in the order they will be tried.
    pub fn order(&self) -> &[NodeId] {
        &self.order
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, ReadError> {
        self.timed(offset, len).await
    }

    /// Reads the whole block.
    pub async fn read_all(&self) -> Result<Bytes, ReadError> {
        self.timed(0, MAX_BLOCK_SIZE).await
    }

    async fn timed(&self, offset: u64, len: u64) -> Result<Bytes, ReadError> {
        let t0 = std::time::Instant::now();
        let r = self.read_range(offset, len).await.map(|(b, _)| b);
        if r.is_ok() {
            self.shared.metrics.read_us.record(t0.elapsed());
        }
        r
    }

    /// Reads `[offset, offset + len)`, clamped to the block's end when `len` reaches past
    /// it only because it was given as "to the end" ([`MAX_BLOCK_SIZE`]).
    async fn read_range(&self, offset: u64, len: u64) -> Result<(Bytes, NodeId), ReadError> {
        let me = self.shared.me;
        let topo = self.shared.topology();
        let local_idc = topo.location(me).idc;
        let (local, remote): (Vec<NodeId>, Vec<NodeId>) = self
            .order
            .iter()
            .partition(|&&n| topo.location(n).idc == local_idc);
        let mut tried: Vec<(String, ReplicaFailure)> = Vec::new();
        // The reader's IDC first, with hedging; the other IDC only if it cannot serve.
        for group in [local, remote] {
            if group.is_empty() {
                continue;
            }
            let mut inflight = FuturesUnordered::new();
            let mut next = 0;
            let start = |n: NodeId| {
                let f = self.read_replica(n, offset, len);
                async move { (n, f.await) }
            };
            inflight.push(start(group[0]));
            next += 1;
            loop {
                let hedge = async {
                    match self.params.hedge_after {
                        Some(d) if next < group.len() => {
                            tokio::time::sleep(d).await;
                            // A healthy replica has answered by now and said how long
                            // the block is: the range gets the time it takes at
                            // `hedge_rate` before another replica is asked too.
                            let known = self.learned_len.load(std::sync::atomic::Ordering::Relaxed);
                            let range = len.min(known.saturating_sub(offset));
                            let rate = self.params.hedge_rate.max(1) as f64;
                            let more = (range as f64 / rate).min(3600.0);
                            tokio::time::sleep(Duration::from_secs_f64(more)).await
                        }
                        _ => std::future::pending().await,
                    }
                };
                tokio::select! {
                    done = inflight.next() => {
                        let Some((node, result)) = done else { break };
                        match result {
                            Ok(bytes) => return Ok((bytes, node)),
                            Err(ReplicaFailure::OutOfRange { replica_len }) => {
                                return Err(ReadError::OutOfRange { block: self.block, offset, len, block_len: replica_len });
                            }
                            Err(f) => {
                                if matches!(f, ReplicaFailure::Corrupt(_)) {
                                    self.shared.emit(NodeEvent::CorruptReplica { block: self.block, genstamp: self.genstamp, node });
                                }
                                tried.push((self.shared.name(node), f));
                            }
                        }
                        if next < group.len() {
                            inflight.push(start(group[next]));
                            next += 1;
                        } else if inflight.is_empty() {
                            break;
                        }
                    }
                    _ = hedge => {
                        tracing::debug!(block = %self.block, node = %self.shared.name(group[next]), "hedging a slow read");
                        inflight.push(start(group[next]));
                        next += 1;
                    }
                }
            }
        }
        Err(ReadError::NoReplica {
            block: self.block,
            tried,
        })
    }

    async fn read_replica(
        &self,
        node: NodeId,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, ReplicaFailure> {
        let tier = self.shared.topology().tier(self.shared.me, node);
        let t = self.params.replica_timeout;
        let bytes = if node == self.shared.me {
            tokio::time::timeout(t, self.read_local_store(offset, len)).await
        } else {
            tokio::time::timeout(t, self.read_peer(node, offset, len)).await
        }
        .map_err(|_| ReplicaFailure::Timeout(t))??;
        if node == self.shared.me {
            self.shared.metrics.read_bytes.add(tier, bytes.len() as u64);
        }
        Ok(bytes)
    }

    async fn read_local_store(&self, offset: u64, len: u64) -> Result<Bytes, ReplicaFailure> {
        let r = self.shared.store.reader(self.block, self.genstamp).await?;
        self.learned_len
            .fetch_max(r.len(), std::sync::atomic::Ordering::Relaxed);
        let len = clamp_len(offset, len, r.len())?;
        let mut out = BytesMut::with_capacity(len as usize);
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(crate::store::MAX_IO as u64) as usize;
            out.extend_from_slice(&r.read(pos, n).await?);
            pos += n as u64;
        }
        Ok(out.freeze())
    }

    async fn read_peer(
        &self,
        node: NodeId,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, ReplicaFailure> {
        let link = |e: &dyn std::fmt::Display| ReplicaFailure::Link(e.to_string());
        let mut s = self
            .shared
            .transport
            .open(node)
            .await
            .map_err(|e| link(&e))?;
        let req = ReadBlock {
            block: self.block,
            genstamp: self.genstamp,
            offset,
            len,
            class: TrafficClass::Read,
            compression: Compression::Zstd,
        };
        // The request is all this side sends: ending the stream with it lets the
        // connection carry the next stream once the answer is read.
        s.writer
            .send_last(&Frame::ReadBlock(req))
            .await
            .map_err(|e| link(&e))?;
        let resp = match s.reader.recv().await.map_err(|e| link(&e))? {
            Some(Frame::ReadResponse(r)) => r,
            Some(Frame::Error(e)) => return Err(ReplicaFailure::from_peer(e.status, e.message)),
            other => return Err(link(&format!("unexpected answer {other:?}"))),
        };
        match resp.status {
            Status::Success => {}
            // The peer refuses a range beyond its replica and says how long it is.
            Status::Rejected if clamp_len(offset, len, resp.replica_len).is_err() => {
                return Err(ReplicaFailure::OutOfRange {
                    replica_len: resp.replica_len,
                });
            }
            s => return Err(ReplicaFailure::from_peer(s, String::new())),
        }
        self.learned_len
            .fetch_max(resp.replica_len, std::sync::atomic::Ordering::Relaxed);
        let len = clamp_len(offset, len, resp.replica_len)?;
        let spec = resp.checksum;
        let bpc = u64::from(spec.bytes_per_chunk());
        let start = offset / bpc * bpc;
        let end = offset + len;
        let mut out = BytesMut::with_capacity(len as usize);
        let mut pos = start;
        while pos < end {
            let p = match s.reader.recv().await.map_err(|e| link(&e))? {
                Some(Frame::Packet(p)) => p,
                Some(Frame::Error(e)) => {
                    return Err(ReplicaFailure::from_peer(e.status, e.message));
                }
                other => return Err(link(&format!("stream ended at {pos}: {other:?}"))),
            };
            // Counted as packets arrive, as they crossed (compressed or not), so the
            // counter follows the link in real time.
            let tier = self.shared.topology().tier(self.shared.me, node);
            self.shared
                .metrics
                .read_bytes
                .add(tier, p.payload.len() as u64);
            self.shared
                .metrics
                .peers
                .received(node, p.payload.len() as u64);
            let p = crate::dci::compress::decompress(p).map_err(|e| {
                ReplicaFailure::Corrupt(format!("packet from {}: {e}", self.shared.name(node)))
            })?;
            if p.offset != pos || p.payload.is_empty() {
                return Err(link(&format!("packet at {} (expected {pos})", p.offset)));
            }
            if p.crcs.len() as u64 != spec.chunks_for(p.payload.len() as u64) {
                return Err(link(&"packet checksum count does not match its data"));
            }
            spec.verify(pos / bpc, &p.payload, &p.crcs).map_err(|m| {
                ReplicaFailure::Corrupt(format!(
                    "data from {} fails its checksum: {m}",
                    self.shared.name(node)
                ))
            })?;
            let pend = pos + p.payload.len() as u64;
            let lo = offset.max(pos) - pos;
            let hi = end.min(pend) - pos;
            if lo < hi {
                out.extend_from_slice(&p.payload[lo as usize..hi as usize]);
            }
            pos = pend;
        }
        Ok(out.freeze())
    }
}

/// Clamps a "to the end" length; refuses a range that starts beyond the replica.
fn clamp_len(offset: u64, len: u64, replica_len: u64) -> Result<u64, ReplicaFailure> {
    let beyond = ReplicaFailure::OutOfRange { replica_len };
    if offset > replica_len {
        return Err(beyond);
    }
    if len == MAX_BLOCK_SIZE {
        return Ok(replica_len - offset);
    }
    if offset + len > replica_len {
        return Err(beyond);
    }
    Ok(len)
}

fn response(status: Status, replica_len: u64, checksum: ChecksumSpec, finalized: bool) -> Frame {
    Frame::ReadResponse(ReadResponse {
        status,
        replica_len,
        checksum,
        finalized,
    })
}

/// The read service: answers one `ReadBlock` from the local store.
pub(crate) async fn serve(shared: Arc<NodeContext>, mut s: Stream, req: ReadBlock) {
    let r = match shared.store.reader(req.block, req.genstamp).await {
        Ok(r) => r,
        Err(e) => {
            let _ = s
                .writer
                .send(&response(
                    Status::from(&e),
                    0,
                    ChecksumSpec::default(),
                    false,
                ))
                .await;
            return;
        }
    };
    let len = match clamp_len(req.offset, req.len, r.len()) {
        Ok(l) => l,
        Err(_) => {
            let _ = s
                .writer
                .send(&response(Status::Rejected, r.len(), r.spec(), r.is_final()))
                .await;
            return;
        }
    };
    if s.writer
        .send(&response(Status::Success, r.len(), r.spec(), r.is_final()))
        .await
        .is_err()
    {
        return;
    }
    let tier = shared.topology().tier(shared.me, s.peer);
    let bpc = u64::from(r.spec().bytes_per_chunk());
    let packet = (SERVE_PACKET_BYTES / bpc).max(1) * bpc;
    let end = req.offset + len;
    let mut pos = req.offset / bpc * bpc;
    let mut seq = 0;
    while pos < end {
        let n = (end.div_ceil(bpc) * bpc).min(r.len()).min(pos + packet) - pos;
        let data = match r.read(pos, n as usize).await {
            Ok(d) => d,
            Err(e) => {
                let _ = s
                    .writer
                    .send(&Frame::Error(ErrorFrame {
                        status: Status::from(&e),
                        message: e.to_string(),
                    }))
                    .await;
                return;
            }
        };
        let p = Packet {
            seq,
            offset: pos,
            flags: PacketFlags {
                last: pos + n >= end,
                ..Default::default()
            },
            data_len: n as u32,
            crcs: r.checksums(pos, n).to_vec(),
            payload: data,
        };
        // A remote reader's packets cross the DCI: governed, compressed if it pays.
        let p = shared
            .dci
            .govern_packet(
                s.peer,
                req.class,
                false,
                req.compression,
                p,
                &shared.metrics,
            )
            .await;
        if s.writer.feed(&Frame::Packet(p)).await.is_err() {
            return;
        }
        shared.metrics.served_bytes.add(tier, n);
        shared.metrics.peers.sent(s.peer, n);
        seq += 1;
        pos += n;
    }
    // Ending the stream flushes: the last packets and the end mark go out together (with
    // word that the connection is kept: the client's end came with its request).
    s.reader.try_end();
    let _ = s.writer.finish().await;
}
