//! The replica meta file: a fixed header, then one checksum per chunk of the data file.
//!
//! ```text
//! offset size
//!  0      8   magic "STRAITMD"
//!  8      2   format version (LE), currently 1
//! 10      1   checksum kind tag (1 = CRC32C)
//! 11      1   flags: bit 0 = sealed (see below), other bits 0
//! 12      4   bytes per chunk (LE)
//! 16      8   block id (LE), so a misnamed file is caught
//! 24      4   CRC32C of bytes 0..24 (LE)
//! 28      4   reserved, 0
//! 32    4*n   one checksum per chunk (LE)
//! ```
//! **Sealed**: finalize rewrites the header with the sealed flag before the one group
//! commit that makes the replica durable, then moves it into `finalized` without waiting
//! for that move to be durable. A replica found in `rbw` after a crash whose header is
//! sealed and whose every chunk verifies was acknowledged as final: recovery finishes the
//! move instead of handing it back as a replica being written. (A sealed header whose
//! chunks do not all verify was never acknowledged: the crash came inside the commit.)
//!
//! Pure encoding and decoding; the store does the IO.

use crate::block::{BlockId, ChecksumKind, ChecksumSpec};

/// Size of the header; checksums start here.
pub(crate) const HEADER_LEN: usize = 32;
const MAGIC: &[u8; 8] = b"STRAITMD";
const VERSION: u16 = 1;
/// Header flag: the replica was finalized (see the module doc).
const SEALED: u8 = 1;

/// Why a meta header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MetaError {
    /// Fewer than `HEADER_LEN` (32) bytes.
    #[error("meta header truncated ({0} bytes)")]
    Truncated(usize),
    /// Not a strait meta file.
    #[error("bad magic")]
    BadMagic,
    /// Written by a newer strait.
    #[error("unsupported meta format version {0}")]
    Version(u16),
    /// Unknown checksum tag.
    #[error("unknown checksum kind {0}")]
    ChecksumKind(u8),
    /// Chunk size outside the supported range.
    #[error("bad bytes per chunk {0}")]
    ChunkSize(u32),
    /// Flag bits this version does not know.
    #[error("unknown meta header flags {0:#04x}")]
    Flags(u8),
    /// The header's own checksum does not match.
    #[error("meta header checksum mismatch")]
    HeaderChecksum,
    /// The header names another block.
    #[error("meta header is for block {found}, file is named for {expected}")]
    WrongBlock {
        /// The block the file is named for.
        expected: BlockId,
        /// The block the header names.
        found: BlockId,
    },
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub spec: ChecksumSpec,
    /// Finalize sealed the replica (see the module doc).
    pub sealed: bool,
}

/// Encodes the header for a replica of `block`.
pub(crate) fn encode_header(block: BlockId, spec: ChecksumSpec) -> [u8; HEADER_LEN] {
    encode(block, spec, false)
}

/// Encodes the header finalize writes: the same, with the sealed flag.
pub(crate) fn encode_sealed_header(block: BlockId, spec: ChecksumSpec) -> [u8; HEADER_LEN] {
    encode(block, spec, true)
}

fn encode(block: BlockId, spec: ChecksumSpec, sealed: bool) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[10] = spec.kind().tag();
    h[11] = if sealed { SEALED } else { 0 };
    h[12..16].copy_from_slice(&spec.bytes_per_chunk().to_le_bytes());
    h[16..24].copy_from_slice(&block.0.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..24]);
    h[24..28].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Decodes and checks a header read from the meta file of `block`.
pub(crate) fn decode_header(block: BlockId, bytes: &[u8]) -> Result<Header, MetaError> {
    let h = bytes
        .get(..HEADER_LEN)
        .ok_or(MetaError::Truncated(bytes.len()))?;
    if &h[0..8] != MAGIC {
        return Err(MetaError::BadMagic);
    }
    let le32 = |r: std::ops::Range<usize>| u32::from_le_bytes(h[r].try_into().unwrap_or_default());
    if le32(24..28) != crc32c::crc32c(&h[0..24]) {
        return Err(MetaError::HeaderChecksum);
    }
    let version = u16::from_le_bytes([h[8], h[9]]);
    if version != VERSION {
        return Err(MetaError::Version(version));
    }
    let kind = ChecksumKind::from_tag(h[10]).ok_or(MetaError::ChecksumKind(h[10]))?;
    if h[11] & !SEALED != 0 {
        return Err(MetaError::Flags(h[11]));
    }
    let bpc = le32(12..16);
    let found = BlockId(u64::from_le_bytes(h[16..24].try_into().unwrap_or_default()));
    if found != block {
        return Err(MetaError::WrongBlock {
            expected: block,
            found,
        });
    }
    let spec = match kind {
        ChecksumKind::Crc32c => ChecksumSpec::crc32c(bpc).map_err(|_| MetaError::ChunkSize(bpc))?,
    };
    Ok(Header {
        spec,
        sealed: h[11] & SEALED != 0,
    })
}

/// Byte offset in the meta file of the checksum of chunk `index`.
pub(crate) fn crc_offset(index: u64) -> u64 {
    HEADER_LEN as u64 + 4 * index
}

/// Writes the little-endian encoding of `crcs` to the front of `out` (4 bytes each).
pub(crate) fn encode_crcs(crcs: &[u32], out: &mut [u8]) {
    for (dst, c) in out.chunks_exact_mut(4).zip(crcs) {
        dst.copy_from_slice(&c.to_le_bytes());
    }
}

/// Decodes the checksums that follow the header; a torn trailing entry is ignored.
pub(crate) fn decode_crcs(body: &[u8]) -> Vec<u32> {
    body.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_damage() {
        let spec = ChecksumSpec::crc32c(8192).unwrap();
        let h = encode_header(BlockId(42), spec);
        let open = Header {
            spec,
            sealed: false,
        };
        assert_eq!(decode_header(BlockId(42), &h), Ok(open));
        let sealed = encode_sealed_header(BlockId(42), spec);
        assert_eq!(
            decode_header(BlockId(42), &sealed),
            Ok(Header {
                sealed: true,
                ..open
            })
        );
        // Only the header checksum differs between the two, and it covers the flag.
        let mut forged = h;
        forged[11] = 1;
        assert_eq!(
            decode_header(BlockId(42), &forged),
            Err(MetaError::HeaderChecksum)
        );
        assert_eq!(
            decode_header(BlockId(43), &h),
            Err(MetaError::WrongBlock {
                expected: BlockId(43),
                found: BlockId(42)
            })
        );
        assert_eq!(
            decode_header(BlockId(42), &h[..10]),
            Err(MetaError::Truncated(10))
        );
        for i in 0..28 {
            let mut bad = h;
            bad[i] ^= 0x40;
            assert!(
                decode_header(BlockId(42), &bad).is_err(),
                "flip in byte {i} accepted"
            );
        }
    }

    #[test]
    fn crcs_round_trip() {
        let mut out = vec![0u8; 13];
        encode_crcs(&[1, 0xdead_beef, 3], &mut out);
        out[12] = 7; // torn tail
        assert_eq!(decode_crcs(&out), vec![1, 0xdead_beef, 3]);
        assert_eq!(crc_offset(2), 40);
    }
}
