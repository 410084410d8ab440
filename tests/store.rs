//! Conformance suite of the block store: one body per behaviour, run against every
//! backend (`uring` where the kernel offers it, and `psync`).

use std::path::Path;

use strait::block::{BlockId, ChecksumSpec, GenStamp};
use strait::store::{
    BackendKind, BlockStore, Durability, ReplicaState, ReplicaWriter, StoreConfig, StoreError,
};

mod common;
use common::pattern;

async fn open(root: &Path, backend: BackendKind) -> BlockStore {
    let mut cfg = StoreConfig::new(root);
    cfg.backend = backend;
    cfg.io_depth = 8;
    BlockStore::open(cfg).await.expect("store opens").0
}

async fn write_all(w: &ReplicaWriter, data: &[u8], packet: usize, durability: Durability) {
    let spec = w.spec();
    let mut off = w.len() as usize;
    for piece in data.chunks(packet) {
        w.write(off as u64, piece, &spec.checksums(piece), durability)
            .await
            .expect("write");
        off += piece.len();
    }
}

async fn read_all(store: &BlockStore, block: BlockId, gs: GenStamp) -> Vec<u8> {
    let r = store.reader(block, gs).await.expect("reader");
    let mut out = Vec::new();
    while (out.len() as u64) < r.len() {
        let n = (r.len() - out.len() as u64).min(1 << 20) as usize;
        out.extend_from_slice(&r.read(out.len() as u64, n).await.expect("read"));
    }
    out
}

const GS: GenStamp = GenStamp(1);

/// Block sizes at the edges of chunks, O_DIRECT alignment and packets.
const SIZES: [usize; 9] = [
    0,
    1,
    4095,
    4096,
    4097,
    65_536,
    65_536 + 1,
    (1 << 20) + 123,
    3 << 20,
];

async fn round_trip_sizes(backend: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), backend).await;
    let spec = ChecksumSpec::default();
    for (i, &size) in SIZES.iter().enumerate() {
        let block = BlockId(i as u64 + 100);
        let data = pattern(i as u64, size);
        let w = store.create(block, GS, spec).await.unwrap();
        write_all(&w, &data, 64 << 10, Durability::Buffered).await;
        assert_eq!(w.finalize().await.unwrap(), size as u64);
        drop(w);
        let info = store.get(block).unwrap();
        assert_eq!(
            (info.state, info.len),
            (ReplicaState::Finalized, size as u64)
        );
        assert_eq!(read_all(&store, block, GS).await, data, "size {size}");
        // Unaligned ranges inside the replica.
        if size > 10 {
            let r = store.reader(block, GS).await.unwrap();
            for (off, len) in [
                (1u64, 1usize),
                (size as u64 / 3, size / 2),
                (size as u64 - 1, 1),
            ] {
                let got = r.read(off, len).await.unwrap();
                assert_eq!(&got[..], &data[off as usize..off as usize + len]);
            }
            let e = r.read(size as u64 - 1, 2).await.unwrap_err();
            assert!(matches!(e, StoreError::OutOfRange { .. }), "{e}");
        }
    }
    drop(store);
    // Reopen: everything is still there, verified.
    let mut cfg = StoreConfig::new(dir.path());
    cfg.backend = backend;
    cfg.verify_on_open = true;
    let (store, report) = BlockStore::open(cfg).await.unwrap();
    assert_eq!(report.finalized, SIZES.len());
    let open = store.create(BlockId(999), GS, spec).await.unwrap();
    assert_eq!(
        store.counts(),
        strait::store::ReplicaCounts {
            finalized: SIZES.len(),
            rbw: 1,
            corrupt: 0
        }
    );
    drop(open);
    assert!(
        report.recovered_rbw.is_empty() && report.quarantined.is_empty(),
        "{report:?}"
    );
    assert_eq!(
        read_all(&store, BlockId(106), GS).await,
        pattern(6, SIZES[6])
    );
}

async fn sync_durability_and_small_chunks(backend: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), backend).await;
    // 512-byte chunks cannot use O_DIRECT; the store must still work.
    let spec = ChecksumSpec::crc32c(512).unwrap();
    let data = pattern(9, 10_000);
    let w = store.create(BlockId(1), GS, spec).await.unwrap();
    write_all(&w, &data, 1536, Durability::Sync).await;
    w.finalize().await.unwrap();
    drop(w);
    assert_eq!(read_all(&store, BlockId(1), GS).await, data);
}

async fn concurrent_appends(backend: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), backend).await;
    let spec = ChecksumSpec::default();
    let data = pattern(3, 64 * 65_536);
    let w = store.create(BlockId(5), GS, spec).await.unwrap();
    // Issue all appends before awaiting any: they reserve ranges in order.
    let futs: Vec<_> = data
        .chunks(65_536)
        .enumerate()
        .map(|(i, piece)| {
            let crcs = spec.checksums(piece);
            let w = &w;
            async move {
                w.write(i as u64 * 65_536, piece, &crcs, Durability::Buffered)
                    .await
            }
        })
        .collect();
    for r in futures_join_all(futs).await {
        r.unwrap();
    }
    assert_eq!(w.finalize().await.unwrap(), data.len() as u64);
    drop(w);
    assert_eq!(read_all(&store, BlockId(5), GS).await, data);
}

/// Polls every future to completion concurrently (no extra dependency for join_all).
async fn futures_join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..futs.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in futs.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|o| o.expect("every future finished"))
        .collect()
}

async fn bad_writes_are_refused(backend: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), backend).await;
    let spec = ChecksumSpec::default();
    let w = store.create(BlockId(7), GS, spec).await.unwrap();
    let d = pattern(1, 8192);
    let crcs = spec.checksums(&d);
    let invalid = |e: StoreError| assert!(matches!(e, StoreError::Invalid { .. }), "{e}");
    invalid(
        w.write(100, &d, &crcs, Durability::Buffered)
            .await
            .unwrap_err(),
    );
    invalid(
        w.write(4096, &d, &crcs, Durability::Buffered)
            .await
            .unwrap_err(),
    );
    invalid(
        w.write(0, &d, &crcs[..1], Durability::Buffered)
            .await
            .unwrap_err(),
    );
    let mut bad = d.clone();
    bad[5000] ^= 0xff;
    let e = w
        .write(0, &bad, &crcs, Durability::Buffered)
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::DataChecksum {
                chunk: 1,
                offset: 4096,
                ..
            }
        ),
        "{e}"
    );
    // Nothing of the refused writes landed.
    assert_eq!(w.len(), 0);
    // A short chunk ends the replica; it can only be rewritten longer.
    let short = &d[..5000];
    w.write(0, short, &spec.checksums(short), Durability::Buffered)
        .await
        .unwrap();
    invalid(
        w.write(
            5000,
            &d[..10],
            &spec.checksums(&d[..10]),
            Durability::Buffered,
        )
        .await
        .unwrap_err(),
    );
    invalid(
        w.write(8192, &d, &crcs, Durability::Buffered)
            .await
            .unwrap_err(),
    );
    let tail = &d[4096..7000];
    w.write(4096, tail, &spec.checksums(tail), Durability::Buffered)
        .await
        .unwrap();
    assert_eq!(w.len(), 7000);
    assert_eq!(w.finalize().await.unwrap(), 7000);
    drop(w);
    assert_eq!(read_all(&store, BlockId(7), GS).await, d[..7000].to_vec());

    let e = store.create(BlockId(7), GS, spec).await.unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::AlreadyExists {
                state: ReplicaState::Finalized,
                ..
            }
        ),
        "{e}"
    );
    let e = store.reader(BlockId(8), GS).await.unwrap_err();
    assert!(matches!(e, StoreError::NotFound { .. }), "{e}");
    let e = store.reader(BlockId(7), GenStamp(2)).await.unwrap_err();
    assert!(matches!(e, StoreError::GenStampMismatch { .. }), "{e}");
    store.delete(BlockId(7), GS).await.unwrap();
    assert!(store.get(BlockId(7)).is_none());
    assert!(store.list().is_empty());
}

async fn corruption_is_detected_and_quarantined(backend: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), backend).await;
    let spec = ChecksumSpec::default();
    let data = pattern(4, 100_000);
    let w = store.create(BlockId(0x0102_0304), GS, spec).await.unwrap();
    write_all(&w, &data, 65_536, Durability::Buffered).await;
    w.finalize().await.unwrap();
    drop(w);
    let path = dir.path().join("finalized/02/03/blk_16909060_1");
    let mut bytes = std::fs::read(&path).expect("data file at its documented path");
    bytes[50_000] ^= 1;
    std::fs::write(&path, &bytes).unwrap();

    let r = store.reader(BlockId(0x0102_0304), GS).await.unwrap();
    // A range that does not touch the bad chunk still reads.
    assert_eq!(&r.read(0, 4096).await.unwrap()[..], &data[..4096]);
    let e = r.read(40_000, 20_000).await.unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::ChecksumMismatch {
                chunk: 12,
                offset: 49_152,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        store.get(BlockId(0x0102_0304)).unwrap().state,
        ReplicaState::Corrupt
    );
    let e = store.reader(BlockId(0x0102_0304), GS).await.unwrap_err();
    assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    drop((r, store));
    let store = open(dir.path(), backend).await;
    assert_eq!(
        store.get(BlockId(0x0102_0304)).unwrap().state,
        ReplicaState::Corrupt,
        "quarantine survives restart"
    );
    // A fresh copy may replace the corrupt replica.
    let w = store.create(BlockId(0x0102_0304), GS, spec).await.unwrap();
    write_all(&w, &data, 65_536, Durability::Buffered).await;
    w.finalize().await.unwrap();
    drop(w);
    assert_eq!(read_all(&store, BlockId(0x0102_0304), GS).await, data);
}

async fn genstamp_bump_and_truncate(backend: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), backend).await;
    let spec = ChecksumSpec::default();
    let data = pattern(5, 40_000);
    let w = store.create(BlockId(9), GS, spec).await.unwrap();
    write_all(&w, &data[..32_768], 8192, Durability::Buffered).await;
    // Recovery: the pipeline agreed on 20 000 bytes acked, with a new genstamp.
    w.truncate_to(20_000).await.unwrap();
    w.bump_genstamp(GenStamp(2)).await.unwrap();
    let e = store.reader(BlockId(9), GS).await.unwrap_err();
    assert!(
        matches!(e, StoreError::GenStampMismatch { .. }),
        "old genstamp refused: {e}"
    );
    // Resume by rewriting the partial chunk, then append the rest.
    let resume = &data[16_384..];
    w.write(
        16_384,
        resume,
        &spec.checksums(resume),
        Durability::Buffered,
    )
    .await
    .unwrap();
    assert_eq!(w.finalize().await.unwrap(), 40_000);
    drop(w);
    assert_eq!(read_all(&store, BlockId(9), GenStamp(2)).await, data);
    // Finalized replicas can be bumped too; lower or equal stamps are refused.
    store
        .bump_genstamp(BlockId(9), GenStamp(2), GenStamp(3))
        .await
        .unwrap();
    let e = store
        .bump_genstamp(BlockId(9), GenStamp(3), GenStamp(3))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Invalid { .. }), "{e}");
    drop(store);
    let store = open(dir.path(), backend).await;
    assert_eq!(store.get(BlockId(9)).unwrap().genstamp, GenStamp(3));
    assert_eq!(read_all(&store, BlockId(9), GenStamp(3)).await, data);
}

async fn rbw_recovery_cuts_to_verified_prefix(backend: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let spec = ChecksumSpec::default();
    let data = pattern(6, 10 * 4096 + 100);
    {
        let store = open(dir.path(), backend).await;
        let w = store.create(BlockId(11), GS, spec).await.unwrap();
        write_all(&w, &data, 4096, Durability::Buffered).await;
        let w2 = store.create(BlockId(12), GS, spec).await.unwrap();
        write_all(&w2, &data[..3 * 4096], 4096, Durability::Buffered).await;
        // Both writers dropped without finalize: a crash, from the store's view.
    }
    // Damage chunk 7 of block 11 on disk.
    let path = dir.path().join("rbw/00/00/blk_11_1");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[7 * 4096 + 10] ^= 0x80;
    std::fs::write(&path, &bytes).unwrap();
    let mut cfg = StoreConfig::new(dir.path());
    cfg.backend = backend;
    let (store, report) = BlockStore::open(cfg).await.unwrap();
    let mut rbw = report.recovered_rbw.clone();
    rbw.sort_by_key(|r| r.block);
    assert_eq!(
        rbw.iter().map(|r| (r.block, r.len)).collect::<Vec<_>>(),
        vec![(BlockId(11), 7 * 4096), (BlockId(12), 3 * 4096)]
    );
    assert_eq!(
        read_all(&store, BlockId(11), GS).await,
        data[..7 * 4096].to_vec()
    );
    // The pipeline can resume the recovered replica.
    let w = store.reopen_rbw(BlockId(11), GS).await.unwrap();
    assert_eq!(w.len(), 7 * 4096);
    write_all(&w, &data[7 * 4096..], 4096, Durability::Buffered).await;
    w.finalize().await.unwrap();
    drop(w);
    assert_eq!(read_all(&store, BlockId(11), GS).await, data);
}

async fn interrupted_finalize_is_finished(backend: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let spec = ChecksumSpec::default();
    let data = pattern(8, 9000);
    {
        let store = open(dir.path(), backend).await;
        let w = store.create(BlockId(13), GS, spec).await.unwrap();
        write_all(&w, &data, 4096, Durability::Sync).await;
    }
    // Crash between the two renames of finalize: meta already moved, data not yet.
    let fin = dir.path().join("finalized/00/00");
    std::fs::create_dir_all(&fin).unwrap();
    std::fs::rename(
        dir.path().join("rbw/00/00/blk_13_1.meta"),
        fin.join("blk_13_1.meta"),
    )
    .unwrap();
    // And a stray data file without meta, which must not become a replica.
    std::fs::write(fin.join("blk_14_1"), b"junk").unwrap();
    let mut cfg = StoreConfig::new(dir.path());
    cfg.backend = backend;
    let (store, report) = BlockStore::open(cfg).await.unwrap();
    assert_eq!(report.finalized, 1);
    assert_eq!(report.quarantined.len(), 1, "{report:?}");
    assert_eq!(
        store.get(BlockId(13)).unwrap().state,
        ReplicaState::Finalized
    );
    assert_eq!(read_all(&store, BlockId(13), GS).await, data);
    assert!(store.reader(BlockId(14), GS).await.is_err());
}

/// Finalize's renames are not waited for: a crash can undo them and leave the replica,
/// sealed, in `rbw`. One whose chunks all verify was acknowledged and comes back
/// finalized; one that does not verify (the crash came inside finalize's commit) comes
/// back as a replica being written, cut to its verified prefix, and stays that way.
async fn sealed_replica_left_in_rbw_is_finished(backend: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let spec = ChecksumSpec::default();
    let good = pattern(15, 3 * 65_536 + 17);
    let torn = pattern(16, 3 * 65_536 + 17);
    {
        let store = open(dir.path(), backend).await;
        for (block, data) in [(15, &good), (16, &torn)] {
            let w = store.create(BlockId(block), GS, spec).await.unwrap();
            write_all(&w, data, 65_536, Durability::Buffered).await;
            w.finalize().await.unwrap();
        }
    }
    // The crash took both renames back.
    let (fin, rbw) = (
        dir.path().join("finalized/00/00"),
        dir.path().join("rbw/00/00"),
    );
    for name in ["blk_15_1", "blk_15_1.meta", "blk_16_1", "blk_16_1.meta"] {
        std::fs::rename(fin.join(name), rbw.join(name)).unwrap();
    }
    // Block 16's second chunk never reached the disk.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(rbw.join("blk_16_1"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xff; 64], 65_536 + 100).unwrap();
    drop(f);
    for round in 0..2 {
        let mut cfg = StoreConfig::new(dir.path());
        cfg.backend = backend;
        let (store, report) = BlockStore::open(cfg).await.unwrap();
        assert_eq!(report.finalized, 1, "round {round}: {report:?}");
        let info = store.get(BlockId(15)).unwrap();
        assert_eq!(
            (info.state, info.len),
            (ReplicaState::Finalized, good.len() as u64)
        );
        assert_eq!(read_all(&store, BlockId(15), GS).await, good);
        // Cut to its verified prefix, and not sealed any more: the second open (which
        // sees a prefix whose chunks all verify) must not promote it.
        let info = store.get(BlockId(16)).unwrap();
        assert_eq!(info.state, ReplicaState::Rbw, "round {round}");
        assert!(info.len <= 65_536, "round {round}: {}", info.len);
        assert_eq!(
            read_all(&store, BlockId(16), GS).await,
            &torn[..info.len as usize]
        );
    }
}

/// A replica's last write and its finalize in one step (the committer writes the data,
/// cuts a padded tail, writes the checksums, seals, syncs and moves it): whole blocks
/// of every size in one write, a last write after earlier ones, and a last write that
/// rewrites a partial last chunk longer. Each reads back whole, after a reopen too.
async fn last_write_and_finalize_in_one_step(backend: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let spec = ChecksumSpec::default();
    let mut expect = Vec::new();
    {
        let store = open(dir.path(), backend).await;
        for (i, &size) in SIZES.iter().enumerate() {
            let block = BlockId(200 + i as u64);
            let data = bytes::Bytes::from(pattern(200 + i as u64, size));
            let w = std::sync::Arc::new(store.create(block, GS, spec).await.unwrap());
            let last = w
                .reserve_owned(0, data.clone(), spec.checksums(&data))
                .unwrap();
            assert_eq!(last.write_and_finalize().await.unwrap(), size as u64);
            let info = store.get(block).unwrap();
            assert_eq!(
                (info.state, info.len),
                (ReplicaState::Finalized, size as u64)
            );
            // Finalized: nothing more is written through it.
            let one = bytes::Bytes::from_static(b"x");
            let more = w.reserve_owned(size as u64, one.clone(), spec.checksums(&one));
            assert!(more.is_err(), "size {size}: a write after the final one");
            assert_eq!(read_all(&store, block, GS).await, data, "size {size}");
            expect.push((block, data.to_vec()));
        }
        // Earlier writes, then the last one: appended after them.
        let data = pattern(300, 3 * 65_536 + 100);
        let w = std::sync::Arc::new(store.create(BlockId(300), GS, spec).await.unwrap());
        write_all(&w, &data[..2 * 65_536], 65_536, Durability::Buffered).await;
        let tail = bytes::Bytes::copy_from_slice(&data[2 * 65_536..]);
        let last = w
            .reserve_owned(2 * 65_536, tail.clone(), spec.checksums(&tail))
            .unwrap();
        assert_eq!(last.write_and_finalize().await.unwrap(), data.len() as u64);
        expect.push((BlockId(300), data));
        // A partial last chunk rewritten longer by the last write: ordered data, cut,
        // checksum.
        let data = pattern(301, 9000);
        let w = std::sync::Arc::new(store.create(BlockId(301), GS, spec).await.unwrap());
        write_all(&w, &data[..5000], 65_536, Durability::Buffered).await;
        let tail = bytes::Bytes::copy_from_slice(&data[4096..]);
        let last = w
            .reserve_owned(4096, tail.clone(), spec.checksums(&tail))
            .unwrap();
        assert_eq!(last.write_and_finalize().await.unwrap(), 9000);
        expect.push((BlockId(301), data));
        for (block, data) in &expect {
            assert_eq!(&read_all(&store, *block, GS).await, data, "{block}");
        }
    }
    let store = open(dir.path(), backend).await;
    for (block, data) in &expect {
        let info = store.get(*block).unwrap();
        assert_eq!(
            (info.state, info.len),
            (ReplicaState::Finalized, data.len() as u64)
        );
        assert_eq!(
            &read_all(&store, *block, GS).await,
            data,
            "{block} after a reopen"
        );
    }
}

/// A reserved write dropped before it ran still lands (as a plain write) when a runtime
/// is there to run it, so the replica finalizes whole; with no runtime it fails the
/// writer instead of leaving its finalize waiting forever, and a recovery's truncate
/// makes the writer usable again.
async fn reserved_write_dropped_unrun(backend: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), backend).await;
    let spec = ChecksumSpec::default();
    let data = bytes::Bytes::from(pattern(400, 65_536));
    let crcs = spec.checksums(&data);

    let w = std::sync::Arc::new(store.create(BlockId(400), GS, spec).await.unwrap());
    drop(w.reserve_owned(0, data.clone(), crcs.clone()).unwrap());
    assert_eq!(w.finalize().await.unwrap(), 65_536);
    assert_eq!(read_all(&store, BlockId(400), GS).await, data);

    let w = std::sync::Arc::new(store.create(BlockId(401), GS, spec).await.unwrap());
    let reserved = w.reserve_owned(0, data.clone(), crcs.clone()).unwrap();
    std::thread::spawn(move || drop(reserved)).join().unwrap();
    let e = w.finalize().await.unwrap_err();
    assert!(matches!(e, StoreError::WriterFailed { .. }), "{e}");
    assert!(e.to_string().contains("dropped before it landed"), "{e}");
    w.truncate_to(0).await.unwrap();
    let last = w.reserve_owned(0, data.clone(), crcs).unwrap();
    assert_eq!(last.write_and_finalize().await.unwrap(), 65_536);
    assert_eq!(read_all(&store, BlockId(401), GS).await, data);
}

/// Names of the replica files under `root/state` (both levels of subdirectories).
fn files_in(root: &Path, state: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![root.join(state)];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

/// A new replica's files are made by whatever first needs them. Written in one
/// `write_and_finalize` (a small block) or finalized empty, the committer creates,
/// writes, seals, commits and moves it: nothing of it is on disk before, its meta is the
/// sealed header and the checksums, and it reads back, after a reopen too. A sync, a
/// write or a genstamp bump before that creates the files in `rbw` as before; a replica
/// nothing touched leaves nothing to recover.
async fn a_new_replica_is_made_by_its_first_write_or_its_finalize(backend: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let spec = ChecksumSpec::default();
    let data = bytes::Bytes::from(pattern(500, 70_000));
    {
        let store = open(dir.path(), backend).await;
        let baseline = store.open_files();
        let w = std::sync::Arc::new(store.create(BlockId(500), GS, spec).await.unwrap());
        assert_eq!(files_in(dir.path(), "rbw"), Vec::<String>::new());
        assert_eq!(store.open_files(), baseline);
        let last = w
            .reserve_owned(0, data.clone(), spec.checksums(&data))
            .unwrap();
        assert_eq!(last.write_and_finalize().await.unwrap(), 70_000);
        assert_eq!(
            files_in(dir.path(), "finalized"),
            vec!["blk_500_1", "blk_500_1.meta"]
        );
        assert_eq!(files_in(dir.path(), "rbw"), Vec::<String>::new());
        let meta_len = std::fs::metadata(dir.path().join("finalized/00/01/blk_500_1.meta"))
            .unwrap()
            .len();
        assert_eq!(meta_len, 32 + 4 * spec.chunks_for(70_000));
        assert_eq!(read_all(&store, BlockId(500), GS).await, data);
        // Final: the writer makes no files for it any more.
        let e = w.bump_genstamp(GenStamp(2)).await.unwrap_err();
        assert!(matches!(e, StoreError::WrongState { .. }), "{e}");
        let e = w.truncate_to(0).await.unwrap_err();
        assert!(matches!(e, StoreError::WrongState { .. }), "{e}");
        assert_eq!(files_in(dir.path(), "rbw"), Vec::<String>::new());

        // Empty: finalized by the committer too.
        let w = store.create(BlockId(501), GS, spec).await.unwrap();
        assert_eq!(w.finalize().await.unwrap(), 0);
        assert_eq!(read_all(&store, BlockId(501), GS).await, Vec::<u8>::new());

        // A sync before any write makes the empty replica's files exist (and durable).
        let w = store.create(BlockId(502), GS, spec).await.unwrap();
        w.write(0, &[], &[], Durability::Sync).await.unwrap();
        assert_eq!(
            files_in(dir.path(), "rbw"),
            vec!["blk_502_1", "blk_502_1.meta"]
        );
        drop(w);
        // A genstamp bump before any write renames files it first creates.
        let w = store.create(BlockId(503), GS, spec).await.unwrap();
        w.bump_genstamp(GenStamp(2)).await.unwrap();
        write_all(&w, &data, 65_536, Durability::Buffered).await;
        assert_eq!(w.finalize().await.unwrap(), 70_000);
        // Never written, never finalized: nothing on disk.
        let w = store.create(BlockId(504), GS, spec).await.unwrap();
        drop(w);
    }
    assert_eq!(
        files_in(dir.path(), "rbw"),
        vec!["blk_502_1", "blk_502_1.meta"]
    );
    let store = open(dir.path(), backend).await;
    assert_eq!(read_all(&store, BlockId(500), GS).await, data);
    assert_eq!(
        store.get(BlockId(501)).unwrap().state,
        ReplicaState::Finalized
    );
    let info = store.get(BlockId(502)).unwrap();
    assert_eq!((info.state, info.len), (ReplicaState::Rbw, 0));
    assert_eq!(read_all(&store, BlockId(503), GenStamp(2)).await, data);
    assert!(store.get(BlockId(504)).is_none());
}

async fn second_open_is_locked(backend: BackendKind) {
    let dir = tempfile::tempdir().unwrap();
    let _store = open(dir.path(), backend).await;
    let mut cfg = StoreConfig::new(dir.path());
    cfg.backend = backend;
    let e = BlockStore::open(cfg).await.unwrap_err();
    assert!(matches!(e, StoreError::Locked { .. }), "{e}");
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod psync {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(strait::store::BackendKind::Psync).await;
                }
            )*
        }
        mod uring {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if !super::uring_available().await {
                        eprintln!("skipped: io_uring cannot be set up on this machine");
                        return;
                    }
                    super::$name(strait::store::BackendKind::Uring).await;
                }
            )*
        }
    };
}

async fn uring_available() -> bool {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = StoreConfig::new(dir.path());
    cfg.backend = BackendKind::Uring;
    BlockStore::open(cfg).await.is_ok()
}

conformance!(
    round_trip_sizes,
    sync_durability_and_small_chunks,
    concurrent_appends,
    bad_writes_are_refused,
    corruption_is_detected_and_quarantined,
    genstamp_bump_and_truncate,
    rbw_recovery_cuts_to_verified_prefix,
    interrupted_finalize_is_finished,
    sealed_replica_left_in_rbw_is_finished,
    second_open_is_locked,
    last_write_and_finalize_in_one_step,
    reserved_write_dropped_unrun,
    a_new_replica_is_made_by_its_first_write_or_its_finalize,
);
