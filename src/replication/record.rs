//! Records of the replication log, and their framing. Pure: no IO.
//!
//! ```text
//! u32 LE  body length (at most MAX_RECORD)
//! u32 LE  CRC32C of the body
//! body:   u8 kind (1 = task, 2 = done), then the fields, little-endian;
//!         names as u8 length + UTF-8, lists as u8 count
//! ```
//! Decoding stops at the first record that is short, too long, fails its CRC or does not
//! parse: everything before it is valid, everything from it on is a torn tail.

use crate::block::{BlockId, GenStamp};
use crate::wire::{MAX_NAME, MAX_TARGETS};

/// Largest record body.
pub const MAX_RECORD: usize = 64 << 10;
const HEADER: usize = 8;

/// A block whose remote copies are still owed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// Position in the log; tasks are taken in this order.
    pub seq: u64,
    /// The block.
    pub block: BlockId,
    /// Its generation stamp when it was finalized locally.
    pub genstamp: GenStamp,
    /// Its length.
    pub len: u64,
    /// Nodes in the writer's IDC that hold it.
    pub sources: Vec<String>,
    /// The IDC it must reach.
    pub target_idc: String,
    /// The nodes there, in pipeline order (the first receives the one DCI copy).
    pub targets: Vec<String>,
    /// When the write was acknowledged, milliseconds since the Unix epoch.
    pub created_ms: u64,
}

/// One log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A new task.
    Task(Task),
    /// The task with this sequence number is finished (or dropped as stale).
    Done {
        /// Its sequence number.
        seq: u64,
    },
}

fn put_name(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(MAX_NAME)];
    out.push(b.len() as u8);
    out.extend_from_slice(b);
}

fn put_names(out: &mut Vec<u8>, v: &[String]) {
    let n = v.len().min(MAX_TARGETS);
    out.push(n as u8);
    for s in &v[..n] {
        put_name(out, s);
    }
}

impl Record {
    /// Appends the framed record to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut body = Vec::with_capacity(128);
        match self {
            Record::Task(t) => {
                body.push(1);
                for v in [t.seq, t.block.0, t.genstamp.0, t.len, t.created_ms] {
                    body.extend_from_slice(&v.to_le_bytes());
                }
                put_names(&mut body, &t.sources);
                put_name(&mut body, &t.target_idc);
                put_names(&mut body, &t.targets);
            }
            Record::Done { seq } => {
                body.push(2);
                body.extend_from_slice(&seq.to_le_bytes());
            }
        }
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        out.extend_from_slice(&body);
    }
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    }
    fn name(&mut self) -> Option<String> {
        let n = self.u8()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
    fn names(&mut self) -> Option<Vec<String>> {
        let n = self.u8()? as usize;
        if n > MAX_TARGETS {
            return None;
        }
        (0..n).map(|_| self.name()).collect()
    }
}

fn parse_body(body: &[u8]) -> Option<Record> {
    let mut c = Cursor(body);
    let rec = match c.u8()? {
        1 => {
            let (seq, block, gs, len, created_ms) =
                (c.u64()?, c.u64()?, c.u64()?, c.u64()?, c.u64()?);
            Record::Task(Task {
                seq,
                block: BlockId(block),
                genstamp: GenStamp(gs),
                len,
                created_ms,
                sources: c.names()?,
                target_idc: c.name()?,
                targets: c.names()?,
            })
        }
        2 => Record::Done { seq: c.u64()? },
        _ => return None,
    };
    c.0.is_empty().then_some(rec)
}

/// Decodes records from the start of `buf`. Returns them and the length of the valid
/// prefix; a shorter prefix than `buf` means the rest is a torn or damaged tail.
pub fn decode_all(buf: &[u8]) -> (Vec<Record>, usize) {
    let mut out = Vec::new();
    let mut pos = 0;
    while buf.len() - pos >= HEADER {
        let len = u32::from_le_bytes(buf[pos..pos + 4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(buf[pos + 4..pos + 8].try_into().unwrap_or_default());
        if len == 0 || len > MAX_RECORD || buf.len() - pos - HEADER < len {
            break;
        }
        let body = &buf[pos + HEADER..pos + HEADER + len];
        if crc32c::crc32c(body) != crc {
            break;
        }
        let Some(rec) = parse_body(body) else { break };
        out.push(rec);
        pos += HEADER + len;
    }
    (out, pos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn task(seq: u64) -> Task {
        Task {
            seq,
            block: BlockId(seq * 10),
            genstamp: GenStamp(3),
            len: 1 << 20,
            sources: vec!["a1".into(), "a2".into()],
            target_idc: "idc-b".into(),
            targets: vec!["b1".into(), "b2".into()],
            created_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn round_trip_and_torn_tail() {
        let recs = vec![
            Record::Task(task(1)),
            Record::Task(task(2)),
            Record::Done { seq: 1 },
        ];
        let mut buf = Vec::new();
        for r in &recs {
            r.encode(&mut buf);
        }
        assert_eq!(decode_all(&buf), (recs.clone(), buf.len()));
        // Cut the last record in the middle: the first two remain, the tail is cut.
        let mut first_two = Vec::new();
        recs[0].encode(&mut first_two);
        recs[1].encode(&mut first_two);
        let (got, valid) = decode_all(&buf[..buf.len() - 3]);
        assert_eq!(got, recs[..2].to_vec());
        assert_eq!(valid, first_two.len());
        // A flipped bit makes that record (and everything after) invalid.
        let mut bad = buf.clone();
        bad[first_two.len() - 2] ^= 1;
        let (got, _) = decode_all(&bad);
        assert_eq!(got, recs[..1].to_vec());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_prefix_is_valid(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let (recs, valid) = decode_all(&data);
            prop_assert!(valid <= data.len());
            let mut again = Vec::new();
            for r in &recs {
                r.encode(&mut again);
            }
            prop_assert_eq!(&again[..], &data[..valid]);
        }
    }
}
