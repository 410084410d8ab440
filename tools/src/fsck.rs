//! `strait fsck --store DIR`: verify every replica of a store (stopped: it takes the
//! store's lock) and report the corrupt ones. Opening the store already cuts `rbw`
//! replicas to their verified prefix and quarantines files that cannot be trusted; fsck
//! then reads every finalized replica through, checking every chunk.

use std::fmt;
use std::path::Path;

use strait::block::{BlockId, GenStamp};
use strait::store::{BackendKind, BlockStore, ReplicaState, StoreConfig, StoreError};

/// What fsck found.
#[derive(Debug, Default)]
pub struct FsckReport {
    /// Finalized replicas that verified.
    pub ok: Vec<(BlockId, GenStamp, u64)>,
    /// Replicas being written, with their verified length.
    pub rbw: Vec<(BlockId, GenStamp, u64)>,
    /// Corrupt replicas (found now or quarantined before), with the reason.
    pub corrupt: Vec<(BlockId, GenStamp, String)>,
    /// Bytes verified.
    pub bytes: u64,
}

/// Verifies the store at `root`.
pub async fn run(root: &Path, backend: BackendKind) -> Result<FsckReport, StoreError> {
    if !root.join("finalized").is_dir() {
        return Err(StoreError::Io {
            op: "open store",
            path: root.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not a strait store (no finalized/ directory)",
            ),
        });
    }
    let mut cfg = StoreConfig::new(root);
    cfg.backend = backend;
    let (store, opened) = BlockStore::open(cfg).await?;
    let mut report = FsckReport::default();
    for (b, g, why) in opened.quarantined {
        report.corrupt.push((b, g, why));
    }
    for r in store.list() {
        match r.state {
            ReplicaState::Rbw => report.rbw.push((r.block, r.genstamp, r.len)),
            ReplicaState::Corrupt => {
                if !report.corrupt.iter().any(|c| c.0 == r.block) {
                    report
                        .corrupt
                        .push((r.block, r.genstamp, "quarantined earlier".into()));
                }
            }
            ReplicaState::Finalized => {
                let reader = match store.reader(r.block, r.genstamp).await {
                    Ok(x) => x,
                    Err(e) => {
                        report.corrupt.push((r.block, r.genstamp, e.to_string()));
                        continue;
                    }
                };
                let mut off = 0;
                let mut bad = None;
                while off < reader.len() {
                    let n = (reader.len() - off).min(8 << 20) as usize;
                    match reader.read(off, n).await {
                        Ok(_) => off += n as u64,
                        Err(e) => {
                            bad = Some(e.to_string());
                            break;
                        }
                    }
                }
                report.bytes += off;
                match bad {
                    None => report.ok.push((r.block, r.genstamp, r.len)),
                    Some(why) => report.corrupt.push((r.block, r.genstamp, why)),
                }
            }
        }
    }
    Ok(report)
}

impl fmt::Display for FsckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (b, g, why) in &self.corrupt {
            writeln!(f, "CORRUPT {b} {g}: {why}")?;
        }
        for (b, g, len) in &self.rbw {
            writeln!(
                f,
                "rbw     {b} {g}: {len} verified bytes (being written or interrupted)"
            )?;
        }
        writeln!(
            f,
            "{} finalized replicas verified ({}), {} rbw, {} corrupt",
            self.ok.len(),
            strait::units::fmt_bytes(self.bytes),
            self.rbw.len(),
            self.corrupt.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strait::block::ChecksumSpec;
    use strait::store::Durability;

    #[tokio::test]
    async fn finds_the_corrupt_replica() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, _) = BlockStore::open(StoreConfig::new(dir.path()))
                .await
                .unwrap();
            let spec = ChecksumSpec::default();
            for b in 1..=3u64 {
                let data = vec![b as u8; 50_000];
                let w = store.create(BlockId(b), GenStamp(1), spec).await.unwrap();
                w.write(0, &data, &spec.checksums(&data), Durability::Buffered)
                    .await
                    .unwrap();
                w.finalize().await.unwrap();
            }
        }
        let path = dir.path().join("finalized/00/00/blk_2_1");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[30_000] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let report = run(dir.path(), BackendKind::Psync).await.unwrap();
        assert_eq!(report.ok.len(), 2);
        assert_eq!(report.corrupt.len(), 1);
        assert_eq!(report.corrupt[0].0, BlockId(2));
        assert!(report.to_string().contains("CORRUPT blk_2 gs1"), "{report}");
        // The corrupt replica is quarantined: a second run reports it again without reading it.
        let again = run(dir.path(), BackendKind::Psync).await.unwrap();
        assert_eq!((again.ok.len(), again.corrupt.len()), (2, 1));
        assert!(
            run(&dir.path().join("nope"), BackendKind::Psync)
                .await
                .is_err()
        );
    }
}
