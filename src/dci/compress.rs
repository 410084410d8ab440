//! zstd on DCI hops, per packet. A packet is compressed only when the link is the
//! bottleneck (its governor has senders waiting) and a sample of the data compresses
//! below a threshold; incompressible data costs one small sample attempt. Checksums stay
//! over the uncompressed data and are verified after decompression, which is bounded: a
//! packet never expands past its declared length, itself at most the packet limit.

use bytes::Bytes;

use crate::wire::{MAX_PAYLOAD, Packet};

/// When to compress.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompressPolicy {
    /// Bytes of the packet tried first.
    pub sample_bytes: usize,
    /// Compress only if the sample shrinks below this fraction.
    pub max_ratio: f64,
    /// zstd level (1 is ~0.4 GB/s per core here).
    pub level: i32,
}

impl Default for CompressPolicy {
    fn default() -> Self {
        CompressPolicy {
            sample_bytes: 16 << 10,
            max_ratio: 0.8,
            level: 1,
        }
    }
}

/// A compressed payload that cannot be expanded to its declared length.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecompressError {
    /// The declared length is over the packet limit.
    #[error("declared length {0} exceeds the packet limit")]
    TooLarge(u32),
    /// The payload is not a zstd frame, or it expands past the declared length.
    #[error("bad zstd payload: {0}")]
    Corrupt(String),
    /// The payload expanded to another length than declared.
    #[error("payload expanded to {got} bytes, packet declares {declared}")]
    Length {
        /// Bytes produced.
        got: usize,
        /// Bytes declared.
        declared: u32,
    },
}

impl CompressPolicy {
    /// Whether a sample of `data` compresses well enough.
    pub fn worth_it(&self, data: &[u8]) -> bool {
        let sample = &data[..data.len().min(self.sample_bytes)];
        if sample.len() < 512 {
            return false;
        }
        match zstd::bulk::compress(sample, self.level) {
            Ok(c) => (c.len() as f64) < self.max_ratio * sample.len() as f64,
            Err(_) => false,
        }
    }

    /// Compresses an uncompressed packet when the link is `backlogged` and the data
    /// compresses; otherwise returns it unchanged.
    pub fn apply(&self, p: Packet, backlogged: bool) -> Packet {
        if !backlogged || p.flags.compressed || !self.worth_it(&p.payload) {
            return p;
        }
        match zstd::bulk::compress(&p.payload, self.level) {
            Ok(c) if c.len() < p.payload.len() => {
                let mut p = p;
                p.flags.compressed = true;
                p.payload = Bytes::from(c);
                p
            }
            _ => p,
        }
    }
}

/// Expands a compressed packet in place (no-op for an uncompressed one). Bounded: at
/// most the packet's declared `data_len` (≤ the packet limit) is ever produced.
pub fn decompress(mut p: Packet) -> Result<Packet, DecompressError> {
    if !p.flags.compressed {
        return Ok(p);
    }
    if p.data_len as usize > MAX_PAYLOAD {
        return Err(DecompressError::TooLarge(p.data_len));
    }
    let out = zstd::bulk::decompress(&p.payload, p.data_len as usize)
        .map_err(|e| DecompressError::Corrupt(e.to_string()))?;
    if out.len() != p.data_len as usize {
        return Err(DecompressError::Length {
            got: out.len(),
            declared: p.data_len,
        });
    }
    p.payload = Bytes::from(out);
    p.flags.compressed = false;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::ChecksumSpec;
    use crate::wire::PacketFlags;

    fn packet(data: Vec<u8>) -> Packet {
        Packet {
            seq: 0,
            offset: 0,
            flags: PacketFlags::default(),
            data_len: data.len() as u32,
            crcs: ChecksumSpec::default().checksums(&data),
            payload: Bytes::from(data),
        }
    }

    fn text(n: usize) -> Vec<u8> {
        let words = [
            "block ",
            "replica ",
            "pipeline ",
            "idc-a ",
            "idc-b ",
            "genstamp ",
            "42 ",
            "\n",
        ];
        (0..)
            .flat_map(|i: usize| words[(i * 7 + i / 3) % words.len()].bytes())
            .take(n)
            .collect()
    }

    fn random(n: usize) -> Vec<u8> {
        let mut x = 0x1234_5678_9abc_def1u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn text_shrinks_and_round_trips_random_is_left_alone() {
        let policy = CompressPolicy::default();
        let t = packet(text(1 << 20));
        let c = policy.apply(t.clone(), true);
        assert!(c.flags.compressed);
        assert!(
            c.payload.len() < t.payload.len() / 2,
            "text crossed at {} of {}",
            c.payload.len(),
            t.payload.len()
        );
        let back = decompress(c).unwrap();
        assert_eq!(back, t);
        ChecksumSpec::default()
            .verify(0, &back.payload, &back.crcs)
            .unwrap();

        let r = packet(random(1 << 20));
        let c = policy.apply(r.clone(), true);
        assert!(!c.flags.compressed);
        assert_eq!(c, r);
        // Not backlogged: never compressed.
        assert!(!policy.apply(t.clone(), false).flags.compressed);
    }

    #[test]
    fn zstd_bomb_is_refused() {
        // 64 MiB of zeros compresses to a few KiB; declared as a 1 MiB packet.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 3).unwrap();
        assert!(bomb.len() < 64 << 10);
        let p = Packet {
            seq: 0,
            offset: 0,
            flags: PacketFlags {
                compressed: true,
                ..Default::default()
            },
            data_len: 1 << 20,
            crcs: vec![],
            payload: Bytes::from(bomb.clone()),
        };
        assert!(matches!(decompress(p), Err(DecompressError::Corrupt(_))));
        let p = Packet {
            seq: 0,
            offset: 0,
            flags: PacketFlags {
                compressed: true,
                ..Default::default()
            },
            data_len: u32::MAX,
            crcs: vec![],
            payload: Bytes::from(bomb),
        };
        assert!(matches!(decompress(p), Err(DecompressError::TooLarge(_))));
        let p = Packet {
            seq: 0,
            offset: 0,
            flags: PacketFlags {
                compressed: true,
                ..Default::default()
            },
            data_len: 100,
            crcs: vec![],
            payload: Bytes::from_static(b"not zstd at all"),
        };
        assert!(matches!(decompress(p), Err(DecompressError::Corrupt(_))));
    }
}
