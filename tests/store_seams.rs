//! Store faults through the fault-injecting engine (`strait::store::faults`): no root, no
//! tmpfs, no child process. A full disk in the middle of a write, EIO on reads and
//! syncs, and a "crash here" cut, each followed by what the store must still guarantee.
//! `store_faults.rs` keeps the same disk-full case on a real tmpfs (root) and a real
//! `kill -9`.

mod common;

use common::pattern;
use std::time::Duration;
use strait::block::{BlockId, ChecksumSpec, GenStamp};
use strait::store::faults::{Fault, FaultOp, FaultPlan, FaultRule};
use strait::store::{BlockStore, Durability, ReplicaState, StoreConfig, StoreError};

const GS: GenStamp = GenStamp(1);
const MIB: usize = 1 << 20;

async fn open(dir: &std::path::Path, plan: Option<&FaultPlan>) -> BlockStore {
    let mut cfg = StoreConfig::new(dir);
    cfg.faults = plan.cloned();
    BlockStore::open(cfg).await.unwrap().0
}

async fn write_block(store: &BlockStore, block: BlockId, data: &[u8]) -> Result<u64, StoreError> {
    let spec = ChecksumSpec::default();
    let w = store.create(block, GS, spec).await?;
    for (i, piece) in data.chunks(MIB).enumerate() {
        w.write(
            (i * MIB) as u64,
            piece,
            &spec.checksums(piece),
            Durability::Buffered,
        )
        .await?;
    }
    w.finalize().await
}

async fn read_all(store: &BlockStore, block: BlockId) -> Result<Vec<u8>, StoreError> {
    let r = store.reader(block, GS).await?;
    let mut out = Vec::new();
    while (out.len() as u64) < r.len() {
        let n = (r.len() - out.len() as u64).min(MIB as u64) as usize;
        out.extend_from_slice(&r.read(out.len() as u64, n).await?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_mid_write_is_a_clean_error_and_recoverable() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    let store = open(dir.path(), Some(&plan)).await;
    let a = pattern(1, 3 * MIB);
    assert_eq!(write_block(&store, BlockId(1), &a).await.unwrap(), 3 << 20);

    // Block 2's fourth data write fills the disk halfway through.
    plan.add(
        FaultRule::new(FaultOp::Write, Fault::ShortWrite(MIB / 2))
            .on_file("blk_2_1")
            .after(3)
            .times(1),
    );
    let spec = ChecksumSpec::default();
    let w = store.create(BlockId(2), GS, spec).await.unwrap();
    let chunk = pattern(2, MIB);
    let crcs = spec.checksums(&chunk);
    let mut written = 0u64;
    let err = loop {
        match w.write(written, &chunk, &crcs, Durability::Buffered).await {
            Ok(()) => written += MIB as u64,
            Err(e) => break e,
        }
        assert!(written < 16 << 20, "the fault never fired");
    };
    assert_eq!(written, 3 << 20, "three whole writes before the full disk");
    assert!(matches!(err, StoreError::NoSpace { .. }), "{err}");
    assert!(err.to_string().contains("no space left"), "{err}");
    // Further writes are refused until the writer is reset; finalize is refused too.
    let again = w
        .write(written + MIB as u64, &chunk, &crcs, Durability::Buffered)
        .await
        .unwrap_err();
    assert!(matches!(again, StoreError::WriterFailed { .. }), "{again}");
    assert!(w.finalize().await.is_err());
    drop(w);
    // The partial replica stays in rbw; the other replica is intact.
    assert_eq!(store.get(BlockId(2)).unwrap().state, ReplicaState::Rbw);
    assert_eq!(read_all(&store, BlockId(1)).await.unwrap(), a);

    // Space again: the store works.
    let c = pattern(3, MIB);
    assert_eq!(write_block(&store, BlockId(3), &c).await.unwrap(), 1 << 20);
    assert_eq!(read_all(&store, BlockId(3)).await.unwrap(), c);
    drop(store);

    // After a restart the rbw replica is its verified prefix: the three whole writes,
    // plus whatever whole chunks of the half write landed with their checksums.
    let store = open(dir.path(), None).await;
    let info = store.get(BlockId(2)).unwrap();
    assert_eq!(info.state, ReplicaState::Rbw);
    assert!(
        (3 << 20..=(3 << 20) + MIB as u64 / 2).contains(&info.len),
        "{}",
        info.len
    );
    assert_eq!(info.len % 4096, 0);
    let got = read_all(&store, BlockId(2)).await.unwrap();
    for (i, piece) in got.chunks(MIB).enumerate() {
        assert_eq!(piece, &chunk[..piece.len()], "MiB {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_on_read_is_an_io_error_not_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    let store = open(dir.path(), Some(&plan)).await;
    let data = pattern(4, 2 * MIB);
    write_block(&store, BlockId(4), &data).await.unwrap();
    plan.add(FaultRule::new(FaultOp::Read, Fault::Eio).times(1));
    let err = read_all(&store, BlockId(4)).await.unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
    // A failing disk read does not condemn the replica: it is still finalized and reads
    // fine once the disk answers again.
    assert_eq!(
        store.get(BlockId(4)).unwrap().state,
        ReplicaState::Finalized
    );
    assert_eq!(read_all(&store, BlockId(4)).await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_sync_at_finalize_leaves_the_replica_unfinalized() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    let store = open(dir.path(), Some(&plan)).await;
    // Finalize makes data and meta durable through the store's group commit (a syncfs
    // of its filesystem): fail that sync.
    plan.add(FaultRule::new(FaultOp::Sync, Fault::Eio).times(1));
    let err = write_block(&store, BlockId(5), &pattern(5, MIB))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Io { op: "fsync", .. }), "{err}");
    assert_eq!(store.get(BlockId(5)).unwrap().state, ReplicaState::Rbw);
}

/// A small block's only write done by the committer with its finalize: a full disk on
/// that write is a typed error, nothing is sealed, synced or moved, the replica stays in
/// `rbw`, and the other replicas of the batch are not held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_on_a_last_write_done_with_its_finalize() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    let store = open(dir.path(), Some(&plan)).await;
    let spec = ChecksumSpec::default();
    plan.add(
        FaultRule::new(FaultOp::Write, Fault::ShortWrite(4096))
            .on_file("blk_6_1")
            .times(1),
    );
    let (bad, good) = (
        bytes::Bytes::from(pattern(6, 65_536)),
        bytes::Bytes::from(pattern(7, 65_536)),
    );
    let wb = std::sync::Arc::new(store.create(BlockId(6), GS, spec).await.unwrap());
    let wg = std::sync::Arc::new(store.create(BlockId(7), GS, spec).await.unwrap());
    let b = wb
        .reserve_owned(0, bad.clone(), spec.checksums(&bad))
        .unwrap();
    let g = wg
        .reserve_owned(0, good.clone(), spec.checksums(&good))
        .unwrap();
    let (rb, rg) = tokio::join!(b.write_and_finalize(), g.write_and_finalize());
    let err = rb.unwrap_err();
    assert!(matches!(err, StoreError::NoSpace { .. }), "{err}");
    assert_eq!(store.get(BlockId(6)).unwrap().state, ReplicaState::Rbw);
    let again = wb.finalize().await.unwrap_err();
    assert!(matches!(again, StoreError::WriterFailed { .. }), "{again}");
    assert_eq!(rg.unwrap(), 65_536);
    assert_eq!(read_all(&store, BlockId(7)).await.unwrap(), good.to_vec());
    drop((wb, wg, store));
    // Reopened: the failed replica was never sealed, so recovery keeps it in rbw at the
    // prefix its checksums cover (none were written).
    let store = open(dir.path(), None).await;
    let info = store.get(BlockId(6)).unwrap();
    assert_eq!((info.state, info.len), (ReplicaState::Rbw, 0));
    assert_eq!(
        store.get(BlockId(7)).unwrap().state,
        ReplicaState::Finalized
    );
}

/// A write whose future is dropped half way (its task aborted, its runtime gone) does
/// not leave the replica's finalize waiting for it forever: the writer fails instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_dropped_half_way_fails_the_writer_instead_of_hanging_it() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    let store = open(dir.path(), Some(&plan)).await;
    let spec = ChecksumSpec::default();
    plan.add(
        FaultRule::new(FaultOp::Write, Fault::Delay(Duration::from_millis(300)))
            .on_file("blk_8_1")
            .times(1),
    );
    let data = bytes::Bytes::from(pattern(8, 65_536));
    let w = std::sync::Arc::new(store.create(BlockId(8), GS, spec).await.unwrap());
    let write = w
        .reserve_owned(0, data.clone(), spec.checksums(&data))
        .unwrap()
        .write(Durability::Buffered);
    // Started (its data write is held by the fault plan), then dropped.
    let cut = tokio::time::timeout(Duration::from_millis(50), write).await;
    assert!(cut.is_err(), "the held write finished early");
    let e = tokio::time::timeout(Duration::from_secs(5), w.finalize())
        .await
        .expect("finalize returns")
        .unwrap_err();
    assert!(matches!(e, StoreError::WriterFailed { .. }), "{e}");
    assert!(e.to_string().contains("dropped before it landed"), "{e}");
    assert_eq!(store.get(BlockId(8)).unwrap().state, ReplicaState::Rbw);
}

/// One durability wait per replica: finalize makes data, meta and the seal durable with
/// one group commit and does not wait for a second one after its renames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalize_waits_for_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    let store = open(dir.path(), Some(&plan)).await;
    // A rule that changes nothing counts the syncs.
    plan.add(FaultRule::new(FaultOp::Sync, Fault::Delay(Duration::ZERO)));
    write_block(&store, BlockId(9), &pattern(9, 65_536))
        .await
        .unwrap();
    assert_eq!(plan.injected(), 1);
    assert_eq!(
        store.get(BlockId(9)).unwrap().state,
        ReplicaState::Finalized
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalizes_that_queue_behind_a_slow_sync_share_the_next_one() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    let store = open(dir.path(), Some(&plan)).await;
    // The first sync takes a second (a slow disk); every later one is only counted.
    plan.add(FaultRule::new(FaultOp::Sync, Fault::Delay(Duration::from_secs(1))).times(1));
    plan.add(FaultRule::new(FaultOp::Sync, Fault::Delay(Duration::ZERO)));
    let first = {
        let store = store.clone();
        tokio::spawn(async move { write_block(&store, BlockId(1), &pattern(1, 65_536)).await })
    };
    // Wait (bounded) until that sync has started.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while plan.injected() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first sync never started"
        );
        tokio::task::yield_now().await;
    }
    // Eight more replicas finalize while it runs: they wait for the next sync, together.
    let rest: Vec<_> = (2..10u64)
        .map(|b| {
            let store = store.clone();
            tokio::spawn(async move { write_block(&store, BlockId(b), &pattern(b, 65_536)).await })
        })
        .collect();
    first.await.unwrap().unwrap();
    for r in rest {
        r.await.unwrap().unwrap();
    }
    assert_eq!(plan.injected(), 2, "nine finalizes, two syncs");
    for b in 1..10u64 {
        assert_eq!(
            store.get(BlockId(b)).unwrap().state,
            ReplicaState::Finalized
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_cut_recovers_to_the_prefix_that_reached_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    let store = open(dir.path(), Some(&plan)).await;
    let done = pattern(6, MIB + 100);
    write_block(&store, BlockId(6), &done).await.unwrap();
    // The machine stops at the third data write of block 7.
    plan.add(
        FaultRule::new(FaultOp::Write, Fault::Crash)
            .on_file("blk_7_1")
            .after(2),
    );
    let data = pattern(7, 4 * MIB);
    let err = write_block(&store, BlockId(7), &data).await.unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
    assert!(plan.crashed());
    // Nothing works after the cut, not even other blocks.
    assert!(read_all(&store, BlockId(6)).await.is_err());
    drop(store);

    let store = open(dir.path(), None).await;
    assert_eq!(read_all(&store, BlockId(6)).await.unwrap(), done);
    let info = store.get(BlockId(7)).unwrap();
    assert_eq!(info.state, ReplicaState::Rbw);
    assert!(info.len <= 2 << 20, "{}", info.len);
    assert_eq!(
        read_all(&store, BlockId(7)).await.unwrap(),
        &data[..info.len as usize]
    );
}

/// A small block's replica made in one hand-off (the committer creates its files, writes
/// data, then the sealed header with the checksums) cut by a crash at its data write or
/// at its meta write: after the restart it is never finalized, it is an `rbw` replica
/// with nothing verified, and its data is not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_inside_a_replica_made_in_one_step_leaves_nothing_final() {
    for file in ["blk_8_1", "blk_8_1.meta"] {
        let dir = tempfile::tempdir().unwrap();
        let plan = FaultPlan::new();
        let store = open(dir.path(), Some(&plan)).await;
        let spec = ChecksumSpec::default();
        plan.add(FaultRule::new(FaultOp::Write, Fault::Crash).on_file(file));
        let data = bytes::Bytes::from(pattern(8, 65_536));
        let w = std::sync::Arc::new(store.create(BlockId(8), GS, spec).await.unwrap());
        let last = w
            .reserve_owned(0, data.clone(), spec.checksums(&data))
            .unwrap();
        let err = last.write_and_finalize().await.unwrap_err();
        assert!(matches!(err, StoreError::Io { .. }), "{file}: {err}");
        assert!(plan.crashed(), "{file}");
        drop((w, store));

        let store = open(dir.path(), None).await;
        let info = store.get(BlockId(8)).unwrap();
        assert_eq!((info.state, info.len), (ReplicaState::Rbw, 0), "{file}");
        assert!(read_all(&store, BlockId(8)).await.unwrap().is_empty());
        assert!(!replica_paths(dir.path(), "finalized", 8, 1).0.exists());
    }
}

/// The files of a replica in `state`'s directory.
fn replica_paths(
    dir: &std::path::Path,
    state: &str,
    block: u64,
    gs: u64,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let d = dir.join(format!(
        "{state}/{:02x}/{:02x}",
        (block >> 16) & 0xff,
        (block >> 8) & 0xff
    ));
    (
        d.join(format!("blk_{block}_{gs}")),
        d.join(format!("blk_{block}_{gs}.meta")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_inside_a_rewrite_of_the_last_chunk_keeps_the_acknowledged_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ChecksumSpec::default();
    let data = pattern(8, 3 * 4096 + 100);
    {
        let store = open(dir.path(), None).await;
        let w = store.create(BlockId(8), GS, spec).await.unwrap();
        // 3 chunks and 100 bytes of a fourth, acknowledged (an hflush).
        w.write(0, &data, &spec.checksums(&data), Durability::Sync)
            .await
            .unwrap();
    }
    // The crash came while that chunk was being rewritten longer: the data file has the
    // longer chunk (same first 100 bytes), the meta still the old checksum.
    let (dp, _) = replica_paths(dir.path(), "rbw", 8, 1);
    let mut longer = data.clone();
    longer.extend_from_slice(&pattern(9, 2000));
    std::fs::write(&dp, &longer).unwrap();
    let store = open(dir.path(), None).await;
    let info = store.get(BlockId(8)).unwrap();
    assert_eq!(info.state, ReplicaState::Rbw);
    assert_eq!(info.len, data.len() as u64, "acknowledged bytes kept");
    assert_eq!(read_all(&store, BlockId(8)).await.unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_renames_of_a_genstamp_bump_keeps_the_replica() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ChecksumSpec::default();
    let data = pattern(10, 2 * 4096 + 5);
    for state in ["rbw", "finalized"] {
        let block = if state == "rbw" { 10 } else { 11 };
        {
            let store = open(dir.path(), None).await;
            let w = store.create(BlockId(block), GS, spec).await.unwrap();
            w.write(0, &data, &spec.checksums(&data), Durability::Sync)
                .await
                .unwrap();
            if state == "finalized" {
                w.finalize().await.unwrap();
            }
        }
        // A bump to genstamp 2 renames meta first, then data: the crash came in between.
        let (_, old_meta) = replica_paths(dir.path(), state, block, 1);
        let (_, new_meta) = replica_paths(dir.path(), state, block, 2);
        std::fs::rename(&old_meta, &new_meta).unwrap();
        let store = open(dir.path(), None).await;
        let info = store.get(BlockId(block)).expect("replica kept");
        assert_eq!(
            (info.genstamp, info.len),
            (GenStamp(2), data.len() as u64),
            "{state}: the bump was finished"
        );
        let r = store.reader(BlockId(block), GenStamp(2)).await.unwrap();
        assert_eq!(&r.read(0, data.len()).await.unwrap()[..], &data[..]);
    }
}
