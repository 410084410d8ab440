//! The scan a store runs when it opens: index finalized replicas, finish interrupted
//! finalizes, cut `rbw` replicas to their verified prefix, quarantine what cannot be
//! trusted. Runs on a blocking thread with plain file IO: it happens once, before the
//! store serves anything.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{
    Entry, Inner, OpenReport, ReplicaInfo, ReplicaState, StoreError, io_err, layout::parse_name,
    meta,
};
use crate::block::{BlockId, ChecksumSpec, GenStamp};

#[derive(Debug, Default, Clone, Copy)]
struct Found {
    data: bool,
    meta: bool,
}

const STATES: [ReplicaState; 3] = [
    ReplicaState::Finalized,
    ReplicaState::Rbw,
    ReplicaState::Corrupt,
];

fn list(
    inner: &Inner,
    state: ReplicaState,
) -> Result<BTreeMap<(BlockId, GenStamp), Found>, StoreError> {
    let mut out: BTreeMap<(BlockId, GenStamp), Found> = BTreeMap::new();
    let top = inner.root.join(state.dir());
    let read = |dir: &Path| fs::read_dir(dir).map_err(|e| io_err("list", dir, e));
    for l1 in read(&top)? {
        let l1 = l1.map_err(|e| io_err("list", &top, e))?.path();
        if !l1.is_dir() {
            continue;
        }
        for l2 in read(&l1)? {
            let l2 = l2.map_err(|e| io_err("list", &l1, e))?.path();
            if !l2.is_dir() {
                continue;
            }
            for f in read(&l2)? {
                let f = f.map_err(|e| io_err("list", &l2, e))?;
                let name = f.file_name();
                let Some((block, gs, is_meta)) = name.to_str().and_then(parse_name) else {
                    tracing::warn!(path = %f.path().display(), "ignoring unknown file in store");
                    continue;
                };
                if inner.dir(state, block) != l2 {
                    tracing::warn!(path = %f.path().display(), "replica file in the wrong directory, ignored");
                    continue;
                }
                let e = out.entry((block, gs)).or_default();
                if is_meta {
                    e.meta = true;
                } else {
                    e.data = true;
                }
            }
        }
    }
    Ok(out)
}

/// Moves whatever files exist of a replica into quarantine.
fn quarantine(
    inner: &Inner,
    from: ReplicaState,
    block: BlockId,
    gs: GenStamp,
) -> Result<(), StoreError> {
    let (od, om) = inner.paths(from, block, gs);
    let (nd, nm) = inner.paths(ReplicaState::Corrupt, block, gs);
    let dir = inner.dir(ReplicaState::Corrupt, block);
    fs::create_dir_all(&dir).map_err(|e| io_err("create", &dir, e))?;
    for (o, n) in [(om, nm), (od, nd)] {
        if o.exists() {
            fs::rename(&o, &n).map_err(|e| io_err("rename", &o, e))?;
        }
    }
    Ok(())
}

fn read_meta(path: &Path, block: BlockId) -> Result<(meta::Header, Vec<u32>), String> {
    let bytes = fs::read(path).map_err(|e| format!("cannot read meta: {e}"))?;
    let header = meta::decode_header(block, &bytes).map_err(|e| format!("meta: {e}"))?;
    Ok((header, meta::decode_crcs(&bytes[meta::HEADER_LEN..])))
}

/// Length of the longest prefix of `data` whose chunks verify against `crcs`.
fn verified_prefix(data_path: &Path, spec: ChecksumSpec, crcs: &[u32]) -> Result<u64, StoreError> {
    let mut f = File::open(data_path).map_err(|e| io_err("open", data_path, e))?;
    let bpc = spec.bytes_per_chunk() as usize;
    let mut buf = vec![0u8; bpc * 256];
    let mut verified = 0u64;
    let mut chunk = 0usize;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match f.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err("read", data_path, e)),
            }
        }
        for piece in buf[..filled].chunks(bpc) {
            match crcs.get(chunk) {
                Some(&c) if spec.checksum(piece) == c => {
                    verified += piece.len() as u64;
                    chunk += 1;
                    if piece.len() < bpc {
                        return Ok(verified);
                    }
                }
                // The last checksum may be older than its chunk: a crash while the last
                // chunk was rewritten longer (data lands before meta). The bytes it
                // covered are still there, unchanged.
                Some(&c) if chunk + 1 == crcs.len() => {
                    return Ok(verified
                        + spec
                            .longest_prefix_matching(piece, c)
                            .map_or(0, |l| l as u64));
                }
                _ => return Ok(verified),
            }
        }
        if filled < buf.len() {
            return Ok(verified);
        }
    }
}

/// Recovers an `rbw` replica: a sealed one whose every chunk verifies is moved into
/// `finalized` (its finalize was acknowledged; only the move was not yet durable); any
/// other is cut to its verified prefix. Returns the state and length it ends in.
fn recover_rbw(
    inner: &Inner,
    block: BlockId,
    gs: GenStamp,
    found: Found,
) -> Result<(ReplicaState, u64), StoreError> {
    let (dp, mp) = inner.paths(ReplicaState::Rbw, block, gs);
    let (spec, sealed, crcs, reset_header) = match read_meta(&mp, block) {
        Ok((h, crcs)) => (h.spec, h.sealed, crcs, false),
        Err(why) => {
            tracing::warn!(%block, %gs, %why, "rbw meta unreadable, replica recovered as empty");
            (ChecksumSpec::default(), false, Vec::new(), true)
        }
    };
    if !found.data {
        File::create(&dp).map_err(|e| io_err("create", &dp, e))?;
    }
    let len = verified_prefix(&dp, spec, &crcs)?;
    let file_len = fs::metadata(&dp).map_err(|e| io_err("stat", &dp, e))?.len();
    if sealed && len == file_len && crcs.len() as u64 == spec.chunks_for(len) {
        inner.move_replica(block, gs, ReplicaState::Rbw, ReplicaState::Finalized)?;
        tracing::info!(%block, %gs, len, "finished a sealed finalize");
        return Ok((ReplicaState::Finalized, len));
    }
    let data = OpenOptions::new()
        .write(true)
        .open(&dp)
        .map_err(|e| io_err("open", &dp, e))?;
    data.set_len(len).map_err(|e| io_err("truncate", &dp, e))?;
    data.sync_all().map_err(|e| io_err("fsync", &dp, e))?;
    let m = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&mp)
        .map_err(|e| io_err("open", &mp, e))?;
    if reset_header || sealed {
        // Unsealed: a crash inside finalize's commit; it is a replica being written.
        m.write_all_at(&meta::encode_header(block, spec), 0)
            .map_err(|e| io_err("write", &mp, e))?;
    }
    m.set_len(meta::crc_offset(spec.chunks_for(len)))
        .map_err(|e| io_err("truncate", &mp, e))?;
    m.sync_all().map_err(|e| io_err("fsync", &mp, e))?;
    Ok((ReplicaState::Rbw, len))
}

/// Checks a finalized replica: meta header, checksum count, and (when `verify`) every
/// chunk. Returns its length, or why it cannot be trusted.
fn check_finalized(
    inner: &Inner,
    block: BlockId,
    gs: GenStamp,
    verify: bool,
) -> Result<Result<u64, String>, StoreError> {
    let (dp, mp) = inner.paths(ReplicaState::Finalized, block, gs);
    let (spec, crcs) = match read_meta(&mp, block) {
        Ok((h, crcs)) => (h.spec, crcs),
        Err(why) => return Ok(Err(why)),
    };
    let len = fs::metadata(&dp).map_err(|e| io_err("stat", &dp, e))?.len();
    if crcs.len() as u64 != spec.chunks_for(len) {
        return Ok(Err(format!("{} checksums for {} bytes", crcs.len(), len)));
    }
    if verify && verified_prefix(&dp, spec, &crcs)? != len {
        return Ok(Err("a chunk fails its checksum".into()));
    }
    Ok(Ok(len))
}

/// Rolls forward genstamp bumps interrupted between their renames: a meta file without
/// data at a stamp, beside a data file without meta at the next older stamp of the same
/// block in the same state.
fn finish_bumps(
    inner: &Inner,
    state: ReplicaState,
    files: &mut BTreeMap<(BlockId, GenStamp), Found>,
) -> Result<(), StoreError> {
    let lone_meta: Vec<(BlockId, GenStamp)> = files
        .iter()
        .filter(|(_, f)| f.meta && !f.data)
        .map(|(&k, _)| k)
        .collect();
    for (block, new) in lone_meta {
        let old = files
            .range((block, GenStamp(0))..(block, new))
            .rev()
            .find(|(_, f)| f.data && !f.meta)
            .map(|(&(_, gs), _)| gs);
        let Some(old) = old else { continue };
        let (od, _) = inner.paths(state, block, old);
        let (nd, _) = inner.paths(state, block, new);
        fs::rename(&od, &nd).map_err(|e| io_err("rename", &od, e))?;
        files.remove(&(block, old));
        if let Some(f) = files.get_mut(&(block, new)) {
            f.data = true;
        }
        tracing::info!(%block, from = %old, to = %new, ?state, "finished an interrupted genstamp bump");
    }
    Ok(())
}

pub(super) fn scan(inner: &Inner, verify: bool) -> Result<OpenReport, StoreError> {
    let mut report = OpenReport::default();
    let mut found: HashMap<ReplicaState, BTreeMap<(BlockId, GenStamp), Found>> = HashMap::new();
    for s in STATES {
        found.insert(s, list(inner, s)?);
    }
    let mut candidates: Vec<(BlockId, GenStamp, ReplicaState, u64)> = Vec::new();
    let quarantined = |report: &mut OpenReport,
                       from: ReplicaState,
                       block: BlockId,
                       gs: GenStamp,
                       why: String|
     -> Result<(), StoreError> {
        tracing::warn!(%block, %gs, %why, "quarantining replica");
        quarantine(inner, from, block, gs)?;
        report.quarantined.push((block, gs, why));
        Ok(())
    };

    // A genstamp bump renames meta, then data: one interrupted in between left the meta
    // under the new stamp and the data under an older one. Finish it.
    for state in [ReplicaState::Finalized, ReplicaState::Rbw] {
        if let Some(files) = found.get_mut(&state) {
            finish_bumps(inner, state, files)?;
        }
    }
    // Finalized replicas; a finalize interrupted between its two renames is finished.
    let finalized = found.remove(&ReplicaState::Finalized).unwrap_or_default();
    let mut rbw = found.remove(&ReplicaState::Rbw).unwrap_or_default();
    for (&(block, gs), &f) in &finalized {
        let mut f = f;
        if f.meta
            && !f.data
            && let Some(r) = rbw.get_mut(&(block, gs)).filter(|r| r.data)
        {
            let (rd, _) = inner.paths(ReplicaState::Rbw, block, gs);
            let (fd, _) = inner.paths(ReplicaState::Finalized, block, gs);
            fs::rename(&rd, &fd).map_err(|e| io_err("rename", &rd, e))?;
            r.data = false;
            f.data = true;
            tracing::info!(%block, %gs, "finished an interrupted finalize");
        }
        if !(f.data && f.meta) {
            quarantined(
                &mut report,
                ReplicaState::Finalized,
                block,
                gs,
                "finalized replica misses its data or meta file".into(),
            )?;
            continue;
        }
        match check_finalized(inner, block, gs, verify)? {
            Ok(len) => candidates.push((block, gs, ReplicaState::Finalized, len)),
            Err(why) => quarantined(&mut report, ReplicaState::Finalized, block, gs, why)?,
        }
    }
    for (&(block, gs), &f) in &rbw {
        if !f.meta && !f.data {
            continue; // its data was rolled forward into finalized above
        }
        if !f.meta {
            quarantined(
                &mut report,
                ReplicaState::Rbw,
                block,
                gs,
                "rbw data without meta".into(),
            )?;
            continue;
        }
        let (state, len) = recover_rbw(inner, block, gs, f)?;
        candidates.push((block, gs, state, len));
    }
    for &(block, gs) in found
        .get(&ReplicaState::Corrupt)
        .map(|m| m.keys())
        .into_iter()
        .flatten()
    {
        candidates.push((block, gs, ReplicaState::Corrupt, 0));
    }

    // One replica per block: the highest genstamp wins, finalized over rbw over corrupt.
    let rank = |s: ReplicaState| match s {
        ReplicaState::Finalized => 2,
        ReplicaState::Rbw => 1,
        ReplicaState::Corrupt => 0,
    };
    candidates.sort_by_key(|&(b, gs, s, _)| (b, std::cmp::Reverse((gs, rank(s)))));
    let mut index = inner.index.lock().unwrap_or_else(|e| e.into_inner());
    for (block, gs, state, len) in candidates {
        if let Some(winner) = index.get(&block) {
            if state != ReplicaState::Corrupt {
                let why = format!("stale: {} {:?} is also here", winner.genstamp, winner.state);
                quarantined(&mut report, state, block, gs, why)?;
            }
            continue;
        }
        index.insert(
            block,
            Entry {
                genstamp: gs,
                state,
                len,
            },
        );
        match state {
            ReplicaState::Finalized => report.finalized += 1,
            ReplicaState::Rbw => report.recovered_rbw.push(ReplicaInfo {
                block,
                genstamp: gs,
                state,
                len,
            }),
            ReplicaState::Corrupt => {}
        }
    }
    Ok(report)
}
