//! [`ReplicaReader`]: verified reads of one replica.

use std::sync::Arc;

use bytes::Bytes;

use super::aligned::round_up;
use super::engine::FileRef;
use super::{BlockStore, MAX_IO, StoreError, io_err};
use crate::block::{BlockId, ChecksumSpec, GenStamp};

/// Verified reads of one replica. Cheap to share by reference; reads may run
/// concurrently.
pub struct ReplicaReader {
    pub(super) store: BlockStore,
    pub(super) block: BlockId,
    pub(super) genstamp: GenStamp,
    pub(super) spec: ChecksumSpec,
    pub(super) data: Arc<FileRef>,
    pub(super) crcs: Arc<Vec<u32>>,
    pub(super) len: u64,
    /// The replica was being written when the reader opened: a range that does not
    /// verify may still be changing, so it is reported, never quarantined.
    pub(super) in_progress: bool,
}

impl std::fmt::Debug for ReplicaReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaReader")
            .field("block", &self.block)
            .field("genstamp", &self.genstamp)
            .field("len", &self.len)
            .finish()
    }
}

impl ReplicaReader {
    /// Length of the replica (as of opening).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the replica is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the replica was finalized (complete and durable) when the reader opened.
    pub fn is_final(&self) -> bool {
        !self.in_progress
    }

    /// The checksum spec.
    pub fn spec(&self) -> ChecksumSpec {
        self.spec
    }

    /// The stored checksums of the chunks that cover `[offset, offset + len)`, for sending
    /// along with the bytes.
    pub fn checksums(&self, offset: u64, len: u64) -> &[u32] {
        let bpc = u64::from(self.spec.bytes_per_chunk());
        let first = (offset / bpc) as usize;
        let last = self.spec.chunks_for(offset + len) as usize;
        &self.crcs[first.min(self.crcs.len())..last.min(self.crcs.len())]
    }

    /// Reads `len` bytes at `offset`, verifying every chunk they touch. A checksum
    /// mismatch quarantines a finalized replica and returns
    /// [`StoreError::ChecksumMismatch`]; on a replica being written it returns
    /// [`StoreError::Unsettled`] and leaves the replica alone.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, StoreError> {
        let block = self.block;
        if len > MAX_IO {
            return Err(StoreError::Invalid {
                block,
                reason: format!("read of {len} bytes exceeds the {MAX_IO}-byte limit"),
            });
        }
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.len)
            .ok_or(StoreError::OutOfRange {
                block,
                offset,
                len: len as u64,
                replica_len: self.len,
            })?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let bpc = u64::from(self.spec.bytes_per_chunk());
        let first_chunk = offset / bpc;
        let start = first_chunk * bpc;
        let chunk_end = (end.div_ceil(bpc) * bpc).min(self.len);
        let want = (chunk_end - start) as usize;
        let inner = &self.store.inner;
        let buf = inner.pool.get_at_least(round_up(want));
        let io_len = if inner.uses_direct(self.spec) {
            round_up(want)
        } else {
            want
        };
        let buf = inner
            .engine
            .read_at(&self.data, start, io_len, buf)
            .await
            .map_err(|e| io_err("read", &self.data.path, e))?;
        let nchunks = self.spec.chunks_for(want as u64) as usize;
        let crcs = self
            .crcs
            .get(first_chunk as usize..first_chunk as usize + nchunks);
        let got = buf.len().min(want);
        let verified = match crcs {
            Some(crcs) if got == want => self
                .spec
                .verify(first_chunk, &buf[..want], crcs)
                .map_err(|m| (m.chunk, m.offset)),
            // Meta or data shorter than the replica claims: the first missing chunk.
            _ => {
                let chunk = first_chunk
                    + (got as u64 / bpc)
                        .min(self.crcs.len() as u64 - first_chunk.min(self.crcs.len() as u64));
                Err((chunk, chunk * bpc))
            }
        };
        if let Err((chunk, coff)) = verified {
            if self.in_progress {
                return Err(StoreError::Unsettled {
                    block,
                    genstamp: self.genstamp,
                    chunk,
                    offset: coff,
                });
            }
            self.store.quarantine(block, self.genstamp).await;
            return Err(StoreError::ChecksumMismatch {
                block,
                genstamp: self.genstamp,
                chunk,
                offset: coff,
                path: self.data.path.clone(),
            });
        }
        let skip = (offset - start) as usize;
        Ok(Bytes::from_owner(buf).slice(skip..skip + len))
    }
}
