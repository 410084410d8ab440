//! Blocks, generation stamps and their checksums.
//!
//! A block is the unit of replication, named by a [`BlockId`] and versioned by a
//! [`GenStamp`] that pipeline recovery bumps so that a stale replica can never pass for a
//! current one. Its bytes are checksummed in chunks ([`ChecksumSpec`], CRC32C per chunk);
//! the checksums travel with the bytes from the writer to every replica's disk and are
//! verified before bytes are handed to anyone. Pure: no IO.

use std::fmt;

/// Largest block strait stores.
pub const MAX_BLOCK_SIZE: u64 = 256 << 20;

/// Default block size.
pub const DEFAULT_BLOCK_SIZE: u64 = 128 << 20;

/// Identifies a block across the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u64);

/// Version of a block's replicas; bumped by pipeline recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GenStamp(pub u64);

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blk_{}", self.0)
    }
}

impl fmt::Display for GenStamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gs{}", self.0)
    }
}

/// The checksum algorithm. Only CRC32C exists today; the tag is stored on disk and on
/// the wire so that another can be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChecksumKind {
    /// CRC32C (Castagnoli), 4 bytes per chunk.
    Crc32c = 1,
}

impl ChecksumKind {
    /// The stable on-disk / on-wire tag.
    pub fn tag(self) -> u8 {
        self as u8
    }

    /// The kind for a tag, if known.
    pub fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            1 => Some(ChecksumKind::Crc32c),
            _ => None,
        }
    }
}

/// How a block's bytes are checksummed: kind and bytes per chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChecksumSpec {
    kind: ChecksumKind,
    bytes_per_chunk: u32,
}

/// Smallest allowed chunk.
pub const MIN_CHUNK: u32 = 512;
/// Largest allowed chunk.
pub const MAX_CHUNK: u32 = 1 << 20;

/// A chunk size outside the supported range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bytes per chunk {0} must be a power of two in {MIN_CHUNK}..={MAX_CHUNK}")]
pub struct BadChunkSize(pub u32);

/// A chunk whose bytes do not match its checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "checksum mismatch in chunk {chunk} (block offset {offset}): stored {expected:#010x}, computed {actual:#010x}"
)]
pub struct ChunkMismatch {
    /// Index of the chunk in the block.
    pub chunk: u64,
    /// Byte offset of the chunk in the block.
    pub offset: u64,
    /// The checksum that came with the data.
    pub expected: u32,
    /// The checksum of the bytes.
    pub actual: u32,
}

impl Default for ChecksumSpec {
    /// CRC32C over 4 KiB chunks: one chunk per page, so O_DIRECT IO never splits one.
    fn default() -> Self {
        ChecksumSpec {
            kind: ChecksumKind::Crc32c,
            bytes_per_chunk: 4096,
        }
    }
}

impl ChecksumSpec {
    /// A CRC32C spec with the given chunk size (a power of two in 512..=1 MiB).
    pub fn crc32c(bytes_per_chunk: u32) -> Result<Self, BadChunkSize> {
        if !bytes_per_chunk.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&bytes_per_chunk)
        {
            return Err(BadChunkSize(bytes_per_chunk));
        }
        Ok(ChecksumSpec {
            kind: ChecksumKind::Crc32c,
            bytes_per_chunk,
        })
    }

    /// The algorithm.
    pub fn kind(&self) -> ChecksumKind {
        self.kind
    }

    /// Bytes per chunk.
    pub fn bytes_per_chunk(&self) -> u32 {
        self.bytes_per_chunk
    }

    /// Number of chunks (the last possibly short) that cover `len` bytes.
    pub fn chunks_for(&self, len: u64) -> u64 {
        len.div_ceil(u64::from(self.bytes_per_chunk))
    }

    /// Checksum of one chunk.
    pub fn checksum(&self, chunk: &[u8]) -> u32 {
        match self.kind {
            ChecksumKind::Crc32c => crc32c::crc32c(chunk),
        }
    }

    /// Checksums of every chunk of `data`, appended to `out`.
    pub fn checksum_chunks(&self, data: &[u8], out: &mut Vec<u32>) {
        out.extend(
            data.chunks(self.bytes_per_chunk as usize)
                .map(|c| self.checksum(c)),
        );
    }

    /// Checksums of every chunk of `data`.
    pub fn checksums(&self, data: &[u8]) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.chunks_for(data.len() as u64) as usize);
        self.checksum_chunks(data, &mut out);
        out
    }

    /// The longest non-empty prefix of `chunk` whose checksum is `crc`, if any: how much
    /// of a last chunk an older checksum still covers after the chunk was rewritten
    /// longer (the rewrite keeps the bytes it had).
    pub fn longest_prefix_matching(&self, chunk: &[u8], crc: u32) -> Option<usize> {
        match self.kind {
            ChecksumKind::Crc32c => {
                let mut running = 0u32;
                let mut best = None;
                for (i, b) in chunk.iter().enumerate() {
                    running = crc32c::crc32c_append(running, std::slice::from_ref(b));
                    if running == crc {
                        best = Some(i + 1);
                    }
                }
                best
            }
        }
    }

    /// Verifies `data`, which starts at chunk `first_chunk` of the block, against `crcs`
    /// (one per chunk of `data`, the last chunk possibly short). The caller checks that
    /// `crcs` has the right count.
    pub fn verify(&self, first_chunk: u64, data: &[u8], crcs: &[u32]) -> Result<(), ChunkMismatch> {
        let bpc = self.bytes_per_chunk as usize;
        for (i, (chunk, &expected)) in data.chunks(bpc).zip(crcs).enumerate() {
            let actual = self.checksum(chunk);
            if actual != expected {
                let chunk = first_chunk + i as u64;
                return Err(ChunkMismatch {
                    chunk,
                    offset: chunk * bpc as u64,
                    expected,
                    actual,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunking() {
        let s = ChecksumSpec::default();
        assert_eq!(s.chunks_for(0), 0);
        assert_eq!(s.chunks_for(1), 1);
        assert_eq!(s.chunks_for(4096), 1);
        assert_eq!(s.chunks_for(4097), 2);
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let crcs = s.checksums(&data);
        assert_eq!(crcs.len(), 3);
        assert_eq!(crcs[2], crc32c::crc32c(&data[8192..]));
        // A shorter checksum still covers a prefix of a chunk rewritten longer.
        let spec = ChecksumSpec::crc32c(4096).unwrap();
        let old = spec.checksum(&data[..100]);
        assert_eq!(spec.longest_prefix_matching(&data[..3000], old), Some(100));
        assert_eq!(spec.longest_prefix_matching(&data[1..3000], old), None);
        s.verify(0, &data, &crcs).unwrap();
        s.verify(1, &data[4096..], &crcs[1..]).unwrap();
        let mut bad = data.clone();
        bad[5000] ^= 1;
        let e = s.verify(0, &bad, &crcs).unwrap_err();
        assert_eq!((e.chunk, e.offset), (1, 4096));
    }

    #[test]
    fn chunk_sizes() {
        assert!(ChecksumSpec::crc32c(512).is_ok());
        assert!(ChecksumSpec::crc32c(1 << 20).is_ok());
        assert_eq!(ChecksumSpec::crc32c(1000), Err(BadChunkSize(1000)));
        assert!(ChecksumSpec::crc32c(256).is_err());
        assert!(ChecksumSpec::crc32c(2 << 20).is_err());
        assert_eq!(ChecksumKind::from_tag(1), Some(ChecksumKind::Crc32c));
        assert_eq!(ChecksumKind::from_tag(9), None);
    }
}
