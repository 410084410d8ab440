//! The strait wire protocol: frames and their codec.
//!
//! Every frame is length-prefixed and versioned:
//!
//! ```text
//! u32 LE  length of what follows (version + type + body), at most MAX_FRAME
//! u8      protocol version (1)
//! u8      frame type
//! ...     body, all integers little-endian
//! ```
//!
//! Strings carry a `u8` (names) or `u16` (messages) length, lists a `u8` or `u32` count,
//! packet payloads a `u32` length. Every length and count is checked against its limit
//! before anything is allocated, and decoding never panics: malformed input is a
//! [`WireError`]. Packet payloads are handed out as slices of the received buffer, never
//! copied. The codec is pure: no IO, no runtime; the transport drives it.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::block::{BlockId, ChecksumKind, ChecksumSpec, GenStamp, MAX_BLOCK_SIZE, MIN_CHUNK};

/// Protocol version spoken by this build.
pub const VERSION: u8 = 1;
/// Size of the length prefix.
pub const LEN_PREFIX: usize = 4;
/// Ends a framed stream on a byte stream that carries several one after another (a
/// reused TLS-over-TCP connection): a zero length prefix, which no frame has.
pub const END_MARK: [u8; LEN_PREFIX] = [0; LEN_PREFIX];
/// Largest packet payload (compressed or not).
pub const MAX_PAYLOAD: usize = 4 << 20;
/// Largest number of chunk checksums in one packet.
pub const MAX_PACKET_CHUNKS: usize = MAX_PAYLOAD / MIN_CHUNK as usize;
/// Largest frame body (everything after the length prefix).
pub const MAX_FRAME: usize = MAX_PAYLOAD + 4 * MAX_PACKET_CHUNKS + 1024;
/// Most downstream targets a request may name.
pub const MAX_TARGETS: usize = 16;
/// Longest node name.
pub const MAX_NAME: usize = 255;
/// Longest error message.
pub const MAX_MESSAGE: usize = 4096;

/// Why bytes could not be decoded as a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The frame ended before a field did.
    #[error("frame truncated reading {what}")]
    Truncated {
        /// The field being read.
        what: &'static str,
    },
    /// The length prefix exceeds [`MAX_FRAME`] (or is too small to hold a header).
    #[error("frame length {len} outside 2..={max}")]
    FrameLength {
        /// The length announced.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A version this build does not speak.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// An unknown frame type.
    #[error("unknown frame type {0}")]
    FrameType(u8),
    /// A count or length over its limit.
    #[error("{what}: {len} exceeds the limit {max}")]
    TooLarge {
        /// The field.
        what: &'static str,
        /// The value announced.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A field holds a value outside its domain.
    #[error("{what}: invalid value {value}")]
    BadValue {
        /// The field.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// A string is not UTF-8 (or a name is empty).
    #[error("{what}: not a valid string")]
    BadString {
        /// The field.
        what: &'static str,
    },
    /// Bytes left over after the body.
    #[error("{0} trailing bytes after the frame body")]
    Trailing(usize),
}

/// Whether a write reaches the remote IDC before it is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WriteMode {
    /// Every replica, in every IDC, before the ack.
    Sync = 0,
    /// The writer's IDC before the ack; the remote IDC in the background.
    Async = 1,
}

/// Traffic classes of the DCI governor, highest priority first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TrafficClass {
    /// Sync pipeline hops.
    Sync = 0,
    /// Reads (remote reads cross the DCI).
    Read = 1,
    /// Background async replication.
    Async = 2,
    /// Re-replication of under-replicated blocks.
    Repair = 3,
}

/// Compression of packet payloads on a hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Payloads are raw block bytes.
    None = 0,
    /// Payloads may be zstd frames (per packet, flagged).
    Zstd = 1,
}

/// Outcome for one node, in acks and responses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Done.
    Success = 0,
    /// Data did not match its checksum.
    ChecksumError = 1,
    /// The node's disk failed.
    DiskError = 2,
    /// The node's disk is full.
    NoSpace = 3,
    /// The node could not reach (or lost) its downstream.
    Unreachable = 4,
    /// The request was refused (bad request, wrong genstamp, wrong state).
    Rejected = 5,
    /// No such replica.
    NotFound = 6,
    /// The replica is corrupt.
    Corrupt = 7,
    /// A new block was refused because the node already holds it (finalized, or at a
    /// newer generation stamp): the block id was reused, not a node failure.
    Exists = 8,
    /// The node holds the block at another generation stamp than the one asked for.
    Stale = 9,
    /// The peer's certificate does not allow the request (a client asking for what only
    /// nodes may do).
    Denied = 10,
    /// No write slot is free at the node now; the writer tries the whole pipeline again
    /// later (gang admission).
    Busy = 11,
}

macro_rules! u8_enum {
    ($t:ident, $what:literal, $($v:ident),*) => {
        impl $t {
            fn from_u8(b: u8) -> Result<Self, WireError> {
                $(if b == $t::$v as u8 { return Ok($t::$v); })*
                Err(WireError::BadValue { what: $what, value: u64::from(b) })
            }
        }
    };
}
u8_enum!(WriteMode, "write mode", Sync, Async);
u8_enum!(TrafficClass, "traffic class", Sync, Read, Async, Repair);

impl TrafficClass {
    /// Every class, highest priority first.
    pub const ALL: [TrafficClass; 4] = [
        TrafficClass::Sync,
        TrafficClass::Read,
        TrafficClass::Async,
        TrafficClass::Repair,
    ];

    /// Its name in configuration, metrics labels and reports: `sync`, `read`, `async`,
    /// `repair`.
    pub fn name(self) -> &'static str {
        match self {
            TrafficClass::Sync => "sync",
            TrafficClass::Read => "read",
            TrafficClass::Async => "async",
            TrafficClass::Repair => "repair",
        }
    }
}
u8_enum!(Compression, "compression", None, Zstd);
u8_enum!(
    Status,
    "status",
    Success,
    ChecksumError,
    DiskError,
    NoSpace,
    Unreachable,
    Rejected,
    NotFound,
    Corrupt,
    Exists,
    Stale,
    Denied,
    Busy
);

/// Opens a write pipeline on the receiving node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteBlock {
    /// The block.
    pub block: BlockId,
    /// Its generation stamp.
    pub genstamp: GenStamp,
    /// Offset of the first packet (0 for a new replica; the acked length on recovery).
    pub offset: u64,
    /// Nodes after the receiver, in pipeline order.
    pub targets: Vec<String>,
    /// Sync or async.
    pub mode: WriteMode,
    /// Traffic class for governed hops.
    pub class: TrafficClass,
    /// Spot: DCI hops use idle capacity only (encoded in the class byte's top bit).
    pub spot: bool,
    /// Chunking and checksum of the data.
    pub checksum: ChecksumSpec,
    /// Whether packets on this hop may be compressed.
    pub compression: Compression,
    /// Async mode, to the pipeline head only: the remote-IDC targets the head queues in
    /// its replication log once the block is final in the local IDC.
    pub remote_targets: Vec<String>,
    /// The client whose write this is, when a client wrote it: set by the pipeline head
    /// from the client's certificate (never taken from the client), forwarded by relays.
    /// Lets every node of the pipeline recognise that client's recovery of its own write.
    pub origin: Option<String>,
    /// A recovery of this block's pipeline (at a new generation stamp), resuming at
    /// `offset` — which may be 0 when nothing was acknowledged yet: the replica is
    /// resumed (or, if already finalized, checked), never created afresh.
    pub resume: bool,
    /// Every node that holds (or, async, will hold) the block once this write is done:
    /// the whole pipeline, upstream included, plus the holders a copy adds to. Each
    /// replica remembers it, so the survivors of a node loss know what to repair.
    pub replicas: Vec<String>,
    /// Nodes dropped from the block's replica set by a pipeline recovery and not
    /// replaced: the block is under-replicated until a repair restores them.
    pub lost: Vec<String>,
}

/// Packet flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PacketFlags {
    /// The last packet of the block: the replica is finalized after it.
    pub last: bool,
    /// Make this packet (and all before it) durable before acking (hsync).
    pub sync: bool,
    /// The payload is a zstd frame of `data_len` bytes.
    pub compressed: bool,
}

impl PacketFlags {
    fn bits(self) -> u8 {
        u8::from(self.last) | u8::from(self.sync) << 1 | u8::from(self.compressed) << 2
    }

    fn from_bits(b: u8) -> Result<Self, WireError> {
        if b & !0b111 != 0 {
            return Err(WireError::BadValue {
                what: "packet flags",
                value: u64::from(b),
            });
        }
        Ok(PacketFlags {
            last: b & 1 != 0,
            sync: b & 2 != 0,
            compressed: b & 4 != 0,
        })
    }
}

/// A run of whole chunks of block data with their checksums.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// Sequence number in the pipeline, from 0.
    pub seq: u64,
    /// Offset of the data in the block.
    pub offset: u64,
    /// Flags.
    pub flags: PacketFlags,
    /// Length of the (uncompressed) data.
    pub data_len: u32,
    /// One checksum per chunk of the uncompressed data.
    pub crcs: Vec<u32>,
    /// The data, or its zstd frame when `flags.compressed`.
    pub payload: Bytes,
}

/// Acknowledges a packet: one status per node from the receiver downstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The packet's sequence number.
    pub seq: u64,
    /// Statuses, the receiving node first.
    pub statuses: Vec<Status>,
}

/// Asks for a range of a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadBlock {
    /// The block.
    pub block: BlockId,
    /// Its generation stamp.
    pub genstamp: GenStamp,
    /// First byte.
    pub offset: u64,
    /// Bytes wanted.
    pub len: u64,
    /// Traffic class (reads crossing the DCI are governed).
    pub class: TrafficClass,
    /// Whether the reader accepts compressed packets.
    pub compression: Compression,
}

/// Answers a [`ReadBlock`]; packets with the data follow a `Success`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadResponse {
    /// Outcome.
    pub status: Status,
    /// Length of the replica (for one being written: what has landed).
    pub replica_len: u64,
    /// Chunking of the replica (packets start on chunk boundaries).
    pub checksum: ChecksumSpec,
    /// The replica is finalized (complete and durable), not still being written.
    pub finalized: bool,
}

/// Asks a node to copy the first `len` bytes of a replica it holds to `targets` (a
/// pipeline): a whole finalized replica, or the acknowledged prefix that brings a spare
/// into a recovering pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyBlock {
    /// The block.
    pub block: BlockId,
    /// Its generation stamp.
    pub genstamp: GenStamp,
    /// Its length.
    pub len: u64,
    /// The pipeline to copy it to.
    pub targets: Vec<String>,
    /// Traffic class.
    pub class: TrafficClass,
    /// The block's replica set once the copy is done (recorded by the new replicas);
    /// empty for a prefix copy to a pipeline's spare, which learns it when it joins.
    pub replicas: Vec<String>,
}

/// Asks a node to bring a block back to its replica set (operators' `strait repair`):
/// the node probes `replicas`, copies the block (class `repair`) from the nearest holder
/// to a replacement for each member that lacks it, and answers a [`RepairResult`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairBlock {
    /// The block.
    pub block: BlockId,
    /// Its generation stamp.
    pub genstamp: GenStamp,
    /// Its length.
    pub len: u64,
    /// The set it should have.
    pub replicas: Vec<String>,
}

/// The answer to a [`RepairBlock`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairResult {
    /// `Success`, or why not.
    pub status: Status,
    /// Every holder once the repair is done.
    pub replicas: Vec<String>,
    /// The new replicas.
    pub copied: Vec<String>,
    /// For each new replica, the tier of the hop that fed it (0 node, 1 rack, 2 IDC,
    /// 3 DCI).
    pub tiers: Vec<u8>,
    /// What went wrong, for an operator.
    pub message: String,
}

/// Most demand entries in one [`ShareReport`] (one per class and provisioning).
pub const MAX_DEMANDS: usize = 8;

/// One entry of a node's DCI demand: bytes per second it could use in `class`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DemandEntry {
    /// Purpose.
    pub class: TrafficClass,
    /// Spot (uses idle capacity, yields first) rather than reserved.
    pub spot: bool,
    /// Bytes per second wanted.
    pub rate: u64,
    /// Relative weight among demands of the same class and provisioning.
    pub weight: u32,
}

/// The grant a reporting node applies (see `scheduler::shares::Holding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldingEntry {
    /// Allocator instance.
    pub epoch: u64,
    /// Grant number.
    pub seq: u64,
    /// Rate, bytes per second.
    pub rate: u64,
    /// Lease left, milliseconds.
    pub remaining_ms: u32,
}

/// A node's demand on its DCI link towards `to_idc`, sent to the link's allocator; the
/// reporter is the authenticated peer. Answered by a [`ShareGrant`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareReport {
    /// The remote IDC (the link is from the reporter's IDC to it).
    pub to_idc: String,
    /// Demand, at most [`MAX_DEMANDS`] entries.
    pub demand: Vec<DemandEntry>,
    /// The grant in force at the reporter.
    pub holding: Option<HoldingEntry>,
}

/// The allocator's answer to a [`ShareReport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareGrant {
    /// `Success`, or why there is no grant.
    pub status: Status,
    /// Allocator instance.
    pub epoch: u64,
    /// Grant number.
    pub seq: u64,
    /// Total rate, bytes per second.
    pub rate: u64,
    /// Of `rate`, per class (sync, read, async, repair).
    pub per_class: [u64; 4],
    /// Lease, milliseconds, counted by the reporter from when it sent its report.
    pub lease_ms: u32,
}

/// A refusal or failure, ending the stream's exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// Machine-readable cause.
    pub status: Status,
    /// For people.
    pub message: String,
}

/// Every frame strait sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Opens a write pipeline.
    WriteBlock(WriteBlock),
    /// Block data.
    Packet(Packet),
    /// Packet acknowledgement.
    Ack(Ack),
    /// Read request.
    ReadBlock(ReadBlock),
    /// Read response header.
    ReadResponse(ReadResponse),
    /// Copy request.
    CopyBlock(CopyBlock),
    /// Error.
    Error(ErrorFrame),
    /// DCI demand for the link's allocator.
    ShareReport(ShareReport),
    /// The allocator's grant.
    ShareGrant(ShareGrant),
    /// Repair request.
    RepairBlock(RepairBlock),
    /// Repair answer.
    RepairResult(RepairResult),
}

/// Top bit of a `WriteBlock`'s class byte: the write is spot.
const SPOT_BIT: u8 = 0x80;
const T_WRITE: u8 = 1;
const T_PACKET: u8 = 2;
const T_ACK: u8 = 3;
const T_READ: u8 = 4;
const T_READ_RESP: u8 = 5;
const T_COPY: u8 = 6;
const T_ERROR: u8 = 7;
const T_SHARE_REPORT: u8 = 8;
const T_SHARE_GRANT: u8 = 9;
const T_REPAIR: u8 = 10;
const T_REPAIR_RESULT: u8 = 11;

// ---- encoding ------------------------------------------------------------------------

fn put_name(dst: &mut BytesMut, s: &str) {
    let b = &s.as_bytes()[..s.len().min(MAX_NAME)];
    dst.put_u8(b.len() as u8);
    dst.put_slice(b);
}

/// A message cut to [`MAX_MESSAGE`] bytes on a character boundary, u16 length first.
fn put_message(dst: &mut BytesMut, message: &str) {
    let mut end = message.len().min(MAX_MESSAGE);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    dst.put_u16_le(end as u16);
    dst.put_slice(&message.as_bytes()[..end]);
}

fn put_names(dst: &mut BytesMut, names: &[String]) {
    let n = names.len().min(MAX_TARGETS);
    dst.put_u8(n as u8);
    for s in &names[..n] {
        put_name(dst, s);
    }
}

fn put_spec(dst: &mut BytesMut, spec: ChecksumSpec) {
    dst.put_u8(spec.kind().tag());
    dst.put_u32_le(spec.bytes_per_chunk());
}

impl Frame {
    /// Encodes the whole frame, length prefix included, onto `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        if let Some(payload) = self.encode_head(dst) {
            dst.put_slice(&payload);
        }
    }

    /// Encodes everything but a packet's payload; returns the payload, which the caller
    /// sends right after the head without copying it. The length prefix covers both.
    ///
    /// Values over the protocol limits (more than [`MAX_TARGETS`] targets, longer names or
    /// messages) are truncated to the limit; senders check limits before building frames.
    pub fn encode_head(&self, dst: &mut BytesMut) -> Option<Bytes> {
        let start = dst.len();
        dst.put_u32_le(0); // patched below
        dst.put_u8(VERSION);
        let mut payload = None;
        match self {
            Frame::WriteBlock(w) => {
                dst.put_u8(T_WRITE);
                dst.put_u64_le(w.block.0);
                dst.put_u64_le(w.genstamp.0);
                dst.put_u64_le(w.offset);
                put_names(dst, &w.targets);
                dst.put_u8(w.mode as u8);
                dst.put_u8(w.class as u8 | if w.spot { SPOT_BIT } else { 0 });
                put_spec(dst, w.checksum);
                dst.put_u8(w.compression as u8);
                put_names(dst, &w.remote_targets);
                put_names(dst, w.origin.as_slice());
                dst.put_u8(u8::from(w.resume));
                put_names(dst, &w.replicas);
                put_names(dst, &w.lost);
            }
            Frame::Packet(p) => {
                dst.put_u8(T_PACKET);
                dst.put_u64_le(p.seq);
                dst.put_u64_le(p.offset);
                dst.put_u8(p.flags.bits());
                dst.put_u32_le(p.data_len);
                let n = p.crcs.len().min(MAX_PACKET_CHUNKS);
                dst.put_u32_le(n as u32);
                for c in &p.crcs[..n] {
                    dst.put_u32_le(*c);
                }
                let body = p.payload.slice(..p.payload.len().min(MAX_PAYLOAD));
                dst.put_u32_le(body.len() as u32);
                payload = Some(body);
            }
            Frame::Ack(a) => {
                dst.put_u8(T_ACK);
                dst.put_u64_le(a.seq);
                let n = a.statuses.len().min(MAX_TARGETS + 1);
                dst.put_u8(n as u8);
                for s in &a.statuses[..n] {
                    dst.put_u8(*s as u8);
                }
            }
            Frame::ReadBlock(r) => {
                dst.put_u8(T_READ);
                dst.put_u64_le(r.block.0);
                dst.put_u64_le(r.genstamp.0);
                dst.put_u64_le(r.offset);
                dst.put_u64_le(r.len);
                dst.put_u8(r.class as u8);
                dst.put_u8(r.compression as u8);
            }
            Frame::ReadResponse(r) => {
                dst.put_u8(T_READ_RESP);
                dst.put_u8(r.status as u8);
                dst.put_u64_le(r.replica_len);
                put_spec(dst, r.checksum);
                dst.put_u8(u8::from(r.finalized));
            }
            Frame::CopyBlock(r) => {
                dst.put_u8(T_COPY);
                dst.put_u64_le(r.block.0);
                dst.put_u64_le(r.genstamp.0);
                dst.put_u64_le(r.len);
                put_names(dst, &r.targets);
                dst.put_u8(r.class as u8);
                put_names(dst, &r.replicas);
            }
            Frame::Error(e) => {
                dst.put_u8(T_ERROR);
                dst.put_u8(e.status as u8);
                put_message(dst, &e.message);
            }
            Frame::RepairBlock(r) => {
                dst.put_u8(T_REPAIR);
                dst.put_u64_le(r.block.0);
                dst.put_u64_le(r.genstamp.0);
                dst.put_u64_le(r.len);
                put_names(dst, &r.replicas);
            }
            Frame::RepairResult(r) => {
                dst.put_u8(T_REPAIR_RESULT);
                dst.put_u8(r.status as u8);
                put_names(dst, &r.replicas);
                put_names(dst, &r.copied);
                let n = r.tiers.len().min(MAX_TARGETS);
                dst.put_u8(n as u8);
                dst.put_slice(&r.tiers[..n]);
                put_message(dst, &r.message);
            }
            Frame::ShareReport(r) => {
                dst.put_u8(T_SHARE_REPORT);
                put_name(dst, &r.to_idc);
                let n = r.demand.len().min(MAX_DEMANDS);
                dst.put_u8(n as u8);
                for d in &r.demand[..n] {
                    dst.put_u8(d.class as u8);
                    dst.put_u8(u8::from(d.spot));
                    dst.put_u64_le(d.rate);
                    dst.put_u32_le(d.weight);
                }
                match &r.holding {
                    None => dst.put_u8(0),
                    Some(h) => {
                        dst.put_u8(1);
                        dst.put_u64_le(h.epoch);
                        dst.put_u64_le(h.seq);
                        dst.put_u64_le(h.rate);
                        dst.put_u32_le(h.remaining_ms);
                    }
                }
            }
            Frame::ShareGrant(g) => {
                dst.put_u8(T_SHARE_GRANT);
                dst.put_u8(g.status as u8);
                dst.put_u64_le(g.epoch);
                dst.put_u64_le(g.seq);
                dst.put_u64_le(g.rate);
                for c in g.per_class {
                    dst.put_u64_le(c);
                }
                dst.put_u32_le(g.lease_ms);
            }
        }
        let body_len = dst.len() - start - LEN_PREFIX + payload.as_ref().map_or(0, Bytes::len);
        dst[start..start + LEN_PREFIX].copy_from_slice(&(body_len as u32).to_le_bytes());
        payload
    }
}

// ---- decoding ------------------------------------------------------------------------

struct Decoder {
    buf: Bytes,
}

impl Decoder {
    fn need(&self, n: usize, what: &'static str) -> Result<(), WireError> {
        if self.buf.remaining() < n {
            Err(WireError::Truncated { what })
        } else {
            Ok(())
        }
    }
    /// A u16-length message of at most [`MAX_MESSAGE`] bytes.
    fn message(&mut self) -> Result<String, WireError> {
        let n = self.u16("message length")? as usize;
        if n > MAX_MESSAGE {
            return Err(WireError::TooLarge {
                what: "message",
                len: n,
                max: MAX_MESSAGE,
            });
        }
        self.string(n, "message")
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        self.need(2, what)?;
        Ok(self.buf.get_u16_le())
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32_le())
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        self.need(8, what)?;
        Ok(self.buf.get_u64_le())
    }
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, WireError> {
        self.need(n, what)?;
        Ok(self.buf.split_to(n))
    }
    fn string(&mut self, n: usize, what: &'static str) -> Result<String, WireError> {
        let b = self.bytes(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| WireError::BadString { what })
    }
    fn name(&mut self, what: &'static str) -> Result<String, WireError> {
        let n = self.u8(what)? as usize;
        let s = self.string(n, what)?;
        if s.is_empty() {
            return Err(WireError::BadString { what });
        }
        Ok(s)
    }
    fn names(&mut self) -> Result<Vec<String>, WireError> {
        let n = self.u8("target count")? as usize;
        if n > MAX_TARGETS {
            return Err(WireError::TooLarge {
                what: "targets",
                len: n,
                max: MAX_TARGETS,
            });
        }
        (0..n).map(|_| self.name("target name")).collect()
    }
    fn spec(&mut self) -> Result<ChecksumSpec, WireError> {
        let tag = self.u8("checksum kind")?;
        let kind = ChecksumKind::from_tag(tag).ok_or(WireError::BadValue {
            what: "checksum kind",
            value: u64::from(tag),
        })?;
        let bpc = self.u32("bytes per chunk")?;
        match kind {
            ChecksumKind::Crc32c => ChecksumSpec::crc32c(bpc).map_err(|_| WireError::BadValue {
                what: "bytes per chunk",
                value: u64::from(bpc),
            }),
        }
    }
    /// A byte that must be 0 (false) or 1 (true).
    fn flag(&mut self, what: &'static str) -> Result<bool, WireError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(WireError::BadValue {
                what,
                value: u64::from(v),
            }),
        }
    }
    fn block_offset(&mut self, what: &'static str) -> Result<u64, WireError> {
        let v = self.u64(what)?;
        if v > MAX_BLOCK_SIZE {
            return Err(WireError::BadValue { what, value: v });
        }
        Ok(v)
    }
}

/// Decodes one frame from the front of `buf` if it holds a whole one; leaves a partial
/// frame in place (returns `Ok(None)`). A length prefix over [`MAX_FRAME`] is refused
/// before any allocation.
pub fn decode_frame(buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
    if buf.len() < LEN_PREFIX {
        return Ok(None);
    }
    let len = frame_len(buf[..LEN_PREFIX].try_into().unwrap_or_default())?;
    if buf.len() < LEN_PREFIX + len {
        return Ok(None);
    }
    buf.advance(LEN_PREFIX);
    decode_body(buf.split_to(len).freeze()).map(Some)
}

/// Checks a length prefix; returns the body length it announces.
pub fn frame_len(prefix: [u8; LEN_PREFIX]) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if !(2..=MAX_FRAME).contains(&len) {
        return Err(WireError::FrameLength {
            len,
            max: MAX_FRAME,
        });
    }
    Ok(len)
}

/// Decodes a frame body (everything after the length prefix). Packet payloads are
/// slices of `body`.
pub fn decode_body(body: Bytes) -> Result<Frame, WireError> {
    let mut r = Decoder { buf: body };
    let version = r.u8("version")?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let frame = match r.u8("frame type")? {
        T_WRITE => {
            let block = BlockId(r.u64("block")?);
            let genstamp = GenStamp(r.u64("genstamp")?);
            let offset = r.block_offset("offset")?;
            let targets = r.names()?;
            let mode = WriteMode::from_u8(r.u8("mode")?)?;
            let class_byte = r.u8("class")?;
            Frame::WriteBlock(WriteBlock {
                block,
                genstamp,
                offset,
                targets,
                mode,
                class: TrafficClass::from_u8(class_byte & !SPOT_BIT)?,
                spot: class_byte & SPOT_BIT != 0,
                checksum: r.spec()?,
                compression: Compression::from_u8(r.u8("compression")?)?,
                remote_targets: r.names()?,
                origin: {
                    let mut o = r.names()?;
                    if o.len() > 1 {
                        return Err(WireError::BadValue {
                            what: "origin count",
                            value: o.len() as u64,
                        });
                    }
                    o.pop()
                },
                resume: r.flag("resume")?,
                replicas: r.names()?,
                lost: r.names()?,
            })
        }
        T_PACKET => {
            let seq = r.u64("seq")?;
            let offset = r.block_offset("packet offset")?;
            let flags = PacketFlags::from_bits(r.u8("flags")?)?;
            let data_len = r.u32("data length")?;
            if data_len as usize > MAX_PAYLOAD {
                return Err(WireError::TooLarge {
                    what: "packet data",
                    len: data_len as usize,
                    max: MAX_PAYLOAD,
                });
            }
            let n = r.u32("checksum count")? as usize;
            if n > MAX_PACKET_CHUNKS {
                return Err(WireError::TooLarge {
                    what: "checksums",
                    len: n,
                    max: MAX_PACKET_CHUNKS,
                });
            }
            r.need(4 * n, "checksums")?;
            let crcs = (0..n).map(|_| r.buf.get_u32_le()).collect();
            let plen = r.u32("payload length")? as usize;
            if plen > MAX_PAYLOAD {
                return Err(WireError::TooLarge {
                    what: "payload",
                    len: plen,
                    max: MAX_PAYLOAD,
                });
            }
            if !flags.compressed && plen != data_len as usize {
                return Err(WireError::BadValue {
                    what: "payload length of an uncompressed packet",
                    value: plen as u64,
                });
            }
            Frame::Packet(Packet {
                seq,
                offset,
                flags,
                data_len,
                crcs,
                payload: r.bytes(plen, "payload")?,
            })
        }
        T_ACK => {
            let seq = r.u64("seq")?;
            let n = r.u8("status count")? as usize;
            if n > MAX_TARGETS + 1 {
                return Err(WireError::TooLarge {
                    what: "statuses",
                    len: n,
                    max: MAX_TARGETS + 1,
                });
            }
            let statuses = (0..n)
                .map(|_| Status::from_u8(r.u8("status")?))
                .collect::<Result<_, _>>()?;
            Frame::Ack(Ack { seq, statuses })
        }
        T_READ => Frame::ReadBlock(ReadBlock {
            block: BlockId(r.u64("block")?),
            genstamp: GenStamp(r.u64("genstamp")?),
            offset: r.block_offset("offset")?,
            len: r.block_offset("length")?,
            class: TrafficClass::from_u8(r.u8("class")?)?,
            compression: Compression::from_u8(r.u8("compression")?)?,
        }),
        T_READ_RESP => Frame::ReadResponse(ReadResponse {
            status: Status::from_u8(r.u8("status")?)?,
            replica_len: r.block_offset("replica length")?,
            checksum: r.spec()?,
            finalized: r.flag("finalized")?,
        }),
        T_COPY => Frame::CopyBlock(CopyBlock {
            block: BlockId(r.u64("block")?),
            genstamp: GenStamp(r.u64("genstamp")?),
            len: r.block_offset("length")?,
            targets: r.names()?,
            class: TrafficClass::from_u8(r.u8("class")?)?,
            replicas: r.names()?,
        }),
        T_ERROR => Frame::Error(ErrorFrame {
            status: Status::from_u8(r.u8("status")?)?,
            message: r.message()?,
        }),
        T_REPAIR => Frame::RepairBlock(RepairBlock {
            block: BlockId(r.u64("block")?),
            genstamp: GenStamp(r.u64("genstamp")?),
            len: r.block_offset("length")?,
            replicas: r.names()?,
        }),
        T_REPAIR_RESULT => {
            let status = Status::from_u8(r.u8("status")?)?;
            let replicas = r.names()?;
            let copied = r.names()?;
            let n = r.u8("tier count")? as usize;
            if n != copied.len() {
                return Err(WireError::BadValue {
                    what: "tier count",
                    value: n as u64,
                });
            }
            let mut tiers = Vec::with_capacity(n);
            for _ in 0..n {
                let t = r.u8("tier")?;
                if t > 3 {
                    return Err(WireError::BadValue {
                        what: "tier",
                        value: u64::from(t),
                    });
                }
                tiers.push(t);
            }
            Frame::RepairResult(RepairResult {
                status,
                replicas,
                copied,
                tiers,
                message: r.message()?,
            })
        }
        T_SHARE_REPORT => {
            let to_idc = r.name("idc name")?;
            let n = r.u8("demand count")? as usize;
            if n > MAX_DEMANDS {
                return Err(WireError::TooLarge {
                    what: "demands",
                    len: n,
                    max: MAX_DEMANDS,
                });
            }
            let mut demand = Vec::with_capacity(n);
            for _ in 0..n {
                demand.push(DemandEntry {
                    class: TrafficClass::from_u8(r.u8("class")?)?,
                    spot: r.flag("spot")?,
                    rate: r.u64("rate")?,
                    weight: r.u32("weight")?,
                });
            }
            let holding = if r.flag("holding")? {
                Some(HoldingEntry {
                    epoch: r.u64("epoch")?,
                    seq: r.u64("seq")?,
                    rate: r.u64("rate")?,
                    remaining_ms: r.u32("lease left")?,
                })
            } else {
                None
            };
            Frame::ShareReport(ShareReport {
                to_idc,
                demand,
                holding,
            })
        }
        T_SHARE_GRANT => Frame::ShareGrant(ShareGrant {
            status: Status::from_u8(r.u8("status")?)?,
            epoch: r.u64("epoch")?,
            seq: r.u64("seq")?,
            rate: r.u64("rate")?,
            per_class: [
                r.u64("rate")?,
                r.u64("rate")?,
                r.u64("rate")?,
                r.u64("rate")?,
            ],
            lease_ms: r.u32("lease")?,
        }),
        t => return Err(WireError::FrameType(t)),
    };
    if r.buf.has_remaining() {
        return Err(WireError::Trailing(r.buf.remaining()));
    }
    Ok(frame)
}

#[doc(hidden)]
/// Decodes arbitrary bytes as a sequence of frames and, for each one decoded, checks that
/// re-encoding gives the same bytes. For fuzzing: panics only if the codec is wrong.
pub fn fuzz_round_trip(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = decode_frame(&mut buf) {
        let mut again = BytesMut::new();
        frame.encode(&mut again);
        let mut copy = again.clone();
        let decoded = decode_frame(&mut copy)
            .expect("re-encoded frame decodes")
            .expect("whole frame");
        assert_eq!(decoded, frame, "decode(encode(frame)) != frame");
        assert!(copy.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(f: &Frame) -> Frame {
        let mut buf = BytesMut::new();
        f.encode(&mut buf);
        let len = buf.len();
        // Every strict prefix is "need more", never an error or a frame.
        for cut in 0..len {
            let mut part = BytesMut::from(&buf[..cut]);
            assert_eq!(decode_frame(&mut part), Ok(None), "prefix of {cut} bytes");
        }
        let out = decode_frame(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        out
    }

    fn packet(n: usize) -> Frame {
        let data: Bytes = (0..n).map(|i| i as u8).collect::<Vec<_>>().into();
        Frame::Packet(Packet {
            seq: 7,
            offset: 65536,
            flags: PacketFlags {
                last: true,
                sync: false,
                compressed: false,
            },
            data_len: n as u32,
            crcs: ChecksumSpec::default().checksums(&data),
            payload: data,
        })
    }

    #[test]
    fn each_frame_round_trips() {
        let frames = vec![
            Frame::WriteBlock(WriteBlock {
                block: BlockId(1),
                genstamp: GenStamp(2),
                offset: 0,
                targets: vec!["a2".into(), "b1".into(), "b2".into()],
                mode: WriteMode::Sync,
                class: TrafficClass::Sync,
                spot: true,
                checksum: ChecksumSpec::default(),
                compression: Compression::Zstd,
                remote_targets: vec!["b3".into()],
                origin: Some("client-a".into()),
                resume: true,
                replicas: vec!["a1".into(), "a2".into(), "b1".into(), "b2".into()],
                lost: vec!["b3".into()],
            }),
            packet(0),
            packet(10_000),
            Frame::Ack(Ack {
                seq: 9,
                statuses: vec![Status::Success, Status::DiskError],
            }),
            Frame::ReadBlock(ReadBlock {
                block: BlockId(3),
                genstamp: GenStamp(4),
                offset: 5,
                len: 6,
                class: TrafficClass::Read,
                compression: Compression::None,
            }),
            Frame::ReadResponse(ReadResponse {
                status: Status::Corrupt,
                replica_len: 99,
                checksum: ChecksumSpec::crc32c(512).unwrap(),
                finalized: true,
            }),
            Frame::CopyBlock(CopyBlock {
                block: BlockId(5),
                genstamp: GenStamp(6),
                len: 7,
                targets: vec!["b3".into()],
                class: TrafficClass::Async,
                replicas: vec!["a1".into(), "b3".into()],
            }),
            Frame::RepairBlock(RepairBlock {
                block: BlockId(8),
                genstamp: GenStamp(2),
                len: 9,
                replicas: vec!["a1".into(), "b2".into()],
            }),
            Frame::RepairResult(RepairResult {
                status: Status::Success,
                replicas: vec!["a1".into(), "a3".into()],
                copied: vec!["a3".into()],
                tiers: vec![2],
                message: String::new(),
            }),
            Frame::Error(ErrorFrame {
                status: Status::Rejected,
                message: "genstamp 3 < 4 ✗".into(),
            }),
        ];
        for f in &frames {
            assert_eq!(&round_trip(f), f);
        }
    }

    #[test]
    fn payload_is_not_copied() {
        let mut buf = BytesMut::new();
        packet(4096).encode(&mut buf);
        let whole = buf.clone().freeze();
        let Frame::Packet(p) = decode_body(whole.slice(LEN_PREFIX..)).unwrap() else {
            panic!()
        };
        let lo = whole.as_ptr() as usize;
        let hi = lo + whole.len();
        let at = p.payload.as_ptr() as usize;
        assert!(
            (lo..hi).contains(&at),
            "payload points into the received buffer"
        );
    }

    #[test]
    fn encode_head_leaves_payload_out() {
        let f = packet(5000);
        let mut head = BytesMut::new();
        let payload = f.encode_head(&mut head).unwrap();
        assert_eq!(payload.len(), 5000);
        let mut whole = BytesMut::new();
        f.encode(&mut whole);
        assert_eq!(&whole[..head.len()], &head[..]);
        assert_eq!(head.len() + payload.len(), whole.len());
    }

    #[test]
    fn bad_input_is_typed() {
        let frame = |body: &[u8]| {
            let mut b = BytesMut::new();
            b.put_u32_le(body.len() as u32);
            b.put_slice(body);
            decode_frame(&mut b)
        };
        assert_eq!(frame(&[2, T_ACK]), Err(WireError::Version(2)));
        assert_eq!(frame(&[1, 99]), Err(WireError::FrameType(99)));
        assert_eq!(
            frame(&[1, T_ACK, 1]),
            Err(WireError::Truncated { what: "seq" })
        );
        let mut ack = vec![1, T_ACK];
        ack.extend_from_slice(&5u64.to_le_bytes());
        ack.push(200);
        assert!(matches!(
            frame(&ack),
            Err(WireError::TooLarge {
                what: "statuses",
                ..
            })
        ));
        let mut ack = vec![1, T_ACK];
        ack.extend_from_slice(&5u64.to_le_bytes());
        ack.extend_from_slice(&[1, 42]);
        assert!(matches!(
            frame(&ack),
            Err(WireError::BadValue { what: "status", .. })
        ));
        let mut ack = vec![1, T_ACK];
        ack.extend_from_slice(&5u64.to_le_bytes());
        ack.extend_from_slice(&[0, 0xff]);
        assert_eq!(frame(&ack), Err(WireError::Trailing(1)));
        // A huge length prefix is refused before anything is read or allocated.
        let mut b = BytesMut::from(&u32::MAX.to_le_bytes()[..]);
        assert!(matches!(
            decode_frame(&mut b),
            Err(WireError::FrameLength { .. })
        ));
        let mut b = BytesMut::from(&1u32.to_le_bytes()[..]);
        b.put_u8(1);
        assert!(matches!(
            decode_frame(&mut b),
            Err(WireError::FrameLength { .. })
        ));
        // A packet that claims more checksums than fit.
        let mut p = vec![1, T_PACKET];
        p.extend_from_slice(&[0; 17]);
        p.extend_from_slice(&0u32.to_le_bytes());
        p.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            frame(&p),
            Err(WireError::TooLarge {
                what: "checksums",
                ..
            })
        ));
    }

    fn arb_name() -> impl Strategy<Value = String> {
        "[a-z0-9.-]{1,40}"
    }
    fn arb_spec() -> impl Strategy<Value = ChecksumSpec> {
        (9u32..=20).prop_map(|s| ChecksumSpec::crc32c(1 << s).unwrap())
    }
    fn arb_class() -> impl Strategy<Value = TrafficClass> {
        prop_oneof![
            Just(TrafficClass::Sync),
            Just(TrafficClass::Read),
            Just(TrafficClass::Async),
            Just(TrafficClass::Repair)
        ]
    }
    fn arb_status() -> impl Strategy<Value = Status> {
        (0u8..12).prop_map(|b| Status::from_u8(b).unwrap())
    }
    fn arb_frame() -> impl Strategy<Value = Frame> {
        let off = 0..=MAX_BLOCK_SIZE;
        prop_oneof![
            (
                any::<u64>(),
                any::<u64>(),
                off.clone(),
                proptest::collection::vec(arb_name(), 0..=MAX_TARGETS),
                any::<bool>(),
                arb_class(),
                arb_spec(),
                any::<bool>(),
                proptest::collection::vec(arb_name(), 0..=MAX_TARGETS),
                proptest::option::of(arb_name()),
                any::<bool>(),
                (
                    proptest::collection::vec(arb_name(), 0..=MAX_TARGETS),
                    proptest::collection::vec(arb_name(), 0..=MAX_TARGETS)
                )
            )
                .prop_map(
                    |(
                        b,
                        g,
                        o,
                        targets,
                        sync,
                        class,
                        checksum,
                        z,
                        remote_targets,
                        origin,
                        resume,
                        (replicas, lost),
                    )| {
                        Frame::WriteBlock(WriteBlock {
                            block: BlockId(b),
                            genstamp: GenStamp(g),
                            offset: o,
                            targets,
                            mode: if sync {
                                WriteMode::Sync
                            } else {
                                WriteMode::Async
                            },
                            class,
                            spot: b % 2 == 1,
                            checksum,
                            compression: if z {
                                Compression::Zstd
                            } else {
                                Compression::None
                            },
                            remote_targets,
                            origin,
                            resume,
                            replicas,
                            lost,
                        })
                    }
                ),
            (
                any::<u64>(),
                off.clone(),
                0u8..8,
                proptest::collection::vec(any::<u8>(), 0..3000),
                proptest::collection::vec(any::<u32>(), 0..50),
                any::<u16>()
            )
                .prop_map(|(seq, offset, bits, payload, crcs, extra)| {
                    let flags = PacketFlags::from_bits(bits).unwrap();
                    let data_len = if flags.compressed {
                        payload.len() as u32 + u32::from(extra)
                    } else {
                        payload.len() as u32
                    };
                    Frame::Packet(Packet {
                        seq,
                        offset,
                        flags,
                        data_len,
                        crcs,
                        payload: payload.into(),
                    })
                }),
            (
                any::<u64>(),
                proptest::collection::vec(arb_status(), 0..=MAX_TARGETS + 1)
            )
                .prop_map(|(seq, statuses)| Frame::Ack(Ack { seq, statuses })),
            (
                any::<u64>(),
                any::<u64>(),
                off.clone(),
                off.clone(),
                arb_class(),
                any::<bool>()
            )
                .prop_map(|(b, g, o, l, class, z)| {
                    Frame::ReadBlock(ReadBlock {
                        block: BlockId(b),
                        genstamp: GenStamp(g),
                        offset: o,
                        len: l,
                        class,
                        compression: if z {
                            Compression::Zstd
                        } else {
                            Compression::None
                        },
                    })
                }),
            (arb_status(), off.clone(), arb_spec(), any::<bool>()).prop_map(
                |(status, replica_len, checksum, finalized)| {
                    Frame::ReadResponse(ReadResponse {
                        status,
                        replica_len,
                        checksum,
                        finalized,
                    })
                }
            ),
            (
                any::<u64>(),
                any::<u64>(),
                off,
                proptest::collection::vec(arb_name(), 0..=MAX_TARGETS),
                arb_class(),
                proptest::collection::vec(arb_name(), 0..=MAX_TARGETS)
            )
                .prop_map(|(b, g, len, targets, class, replicas)| Frame::CopyBlock(
                    CopyBlock {
                        block: BlockId(b),
                        genstamp: GenStamp(g),
                        len,
                        targets,
                        class,
                        replicas
                    }
                )),
            (arb_status(), "\\PC{0,200}")
                .prop_map(|(status, message)| Frame::Error(ErrorFrame { status, message })),
            (
                any::<u64>(),
                any::<u64>(),
                0..=MAX_BLOCK_SIZE,
                proptest::collection::vec(arb_name(), 0..=MAX_TARGETS)
            )
                .prop_map(|(b, g, len, replicas)| Frame::RepairBlock(RepairBlock {
                    block: BlockId(b),
                    genstamp: GenStamp(g),
                    len,
                    replicas
                })),
            (
                arb_status(),
                proptest::collection::vec(arb_name(), 0..=MAX_TARGETS),
                proptest::collection::vec((arb_name(), 0u8..4), 0..=MAX_TARGETS),
                "\\PC{0,100}"
            )
                .prop_map(|(status, replicas, copied, message)| {
                    Frame::RepairResult(RepairResult {
                        status,
                        replicas,
                        tiers: copied.iter().map(|c| c.1).collect(),
                        copied: copied.into_iter().map(|c| c.0).collect(),
                        message,
                    })
                }),
            (
                arb_name(),
                proptest::collection::vec(
                    (arb_class(), any::<bool>(), any::<u64>(), any::<u32>()),
                    0..=MAX_DEMANDS
                ),
                proptest::option::of((any::<u64>(), any::<u64>(), any::<u64>(), any::<u32>()))
            )
                .prop_map(|(to_idc, d, h)| Frame::ShareReport(ShareReport {
                    to_idc,
                    demand: d
                        .into_iter()
                        .map(|(class, spot, rate, weight)| DemandEntry {
                            class,
                            spot,
                            rate,
                            weight
                        })
                        .collect(),
                    holding: h.map(|(epoch, seq, rate, remaining_ms)| HoldingEntry {
                        epoch,
                        seq,
                        rate,
                        remaining_ms
                    }),
                })),
            (
                arb_status(),
                any::<(u64, u64, u64)>(),
                any::<[u64; 4]>(),
                any::<u32>()
            )
                .prop_map(|(status, (epoch, seq, rate), per_class, lease_ms)| {
                    Frame::ShareGrant(ShareGrant {
                        status,
                        epoch,
                        seq,
                        rate,
                        per_class,
                        lease_ms,
                    })
                }),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip(f in arb_frame()) {
            let mut buf = BytesMut::new();
            f.encode(&mut buf);
            let got = decode_frame(&mut buf).unwrap().unwrap();
            prop_assert_eq!(got, f);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn streams_of_frames_split_anywhere(fs in proptest::collection::vec(arb_frame(), 1..5), cut in any::<prop::sample::Index>()) {
            let mut all = BytesMut::new();
            for f in &fs {
                f.encode(&mut all);
            }
            let cut = cut.index(all.len() + 1);
            let mut buf = BytesMut::from(&all[..cut]);
            let mut got = Vec::new();
            while let Some(f) = decode_frame(&mut buf).unwrap() {
                got.push(f);
            }
            buf.extend_from_slice(&all[cut..]);
            while let Some(f) = decode_frame(&mut buf).unwrap() {
                got.push(f);
            }
            prop_assert_eq!(got, fs);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            fuzz_round_trip(&data);
        }
    }
}
