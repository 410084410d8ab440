//! What a replica being written promises while writes run concurrently: a sync write
//! (an hsync packet, empty or not) returns only once every earlier write of the replica
//! is on disk and synced; a reader of the replica sees only what has landed, and never
//! condemns it for what has not. A slow disk is played by the fault engine's `Delay`.

mod common;

use std::time::Duration;

use common::pattern;
use strait::block::{BlockId, ChecksumSpec, GenStamp};
use strait::store::faults::{Fault, FaultOp, FaultPlan, FaultRule};
use strait::store::{BlockStore, Durability, ReplicaState, StoreConfig, StoreError};

const GS: GenStamp = GenStamp(1);
const CHUNK: usize = 4096;

async fn open(dir: &std::path::Path, plan: &FaultPlan) -> BlockStore {
    let mut cfg = StoreConfig::new(dir);
    cfg.faults = Some(plan.clone());
    // Enough IO threads that a delayed operation on one is overtaken on the others.
    cfg.io_threads = 8;
    BlockStore::open(cfg).await.unwrap().0
}

fn data_file(dir: &std::path::Path, block: u64) -> std::path::PathBuf {
    dir.join(format!(
        "rbw/{:02x}/{:02x}/blk_{block}_1",
        (block >> 16) & 0xff,
        (block >> 8) & 0xff
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_sync_write_on_a_chunk_boundary_still_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    let store = open(dir.path(), &plan).await;
    let spec = ChecksumSpec::default();
    let w = store.create(BlockId(1), GS, spec).await.unwrap();
    let chunk = pattern(1, CHUNK);
    w.write(0, &chunk, &spec.checksums(&chunk), Durability::Buffered)
        .await
        .unwrap();
    // Every sync fails from now on: an hsync that syncs must say so.
    plan.add(FaultRule::new(FaultOp::Sync, Fault::Eio));
    let r = w.write(CHUNK as u64, &[], &[], Durability::Sync).await;
    assert!(
        r.is_err(),
        "an empty sync write returned Ok without syncing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_write_waits_for_every_earlier_write() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    let store = open(dir.path(), &plan).await;
    let spec = ChecksumSpec::default();
    let w = store.create(BlockId(2), GS, spec).await.unwrap();
    // The first data write of block 2 is slow.
    plan.add(
        FaultRule::new(FaultOp::Write, Fault::Delay(Duration::from_millis(400)))
            .on_file("blk_2_1")
            .at_offset(0)
            .times(1),
    );
    let a = pattern(2, CHUNK);
    let b = pattern(3, CHUNK);
    let (ca, cb) = (spec.checksums(&a), spec.checksums(&b));
    // The write at offset 0 is the one delayed, whichever reaches the engine first; the
    // sync write checks the disk the moment it returns.
    let (ra, seen) = tokio::join!(w.write(0, &a, &ca, Durability::Buffered), async {
        w.write(CHUNK as u64, &b, &cb, Durability::Sync)
            .await
            .unwrap();
        std::fs::read(data_file(dir.path(), 2)).unwrap()
    });
    ra.unwrap();
    assert_eq!(
        &seen[..CHUNK],
        &a[..],
        "hsync acked before an earlier write landed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_of_a_replica_being_written_sees_only_what_landed() {
    let dir = tempfile::tempdir().unwrap();
    let plan = FaultPlan::new();
    let store = open(dir.path(), &plan).await;
    let spec = ChecksumSpec::default();
    let w = store.create(BlockId(4), GS, spec).await.unwrap();
    plan.add(
        FaultRule::new(FaultOp::Write, Fault::Delay(Duration::from_millis(400)))
            .on_file("blk_4_1")
            .at_offset(0)
            .times(1),
    );
    let a = pattern(4, CHUNK);
    let b = pattern(5, CHUNK);
    let (ca, cb) = (spec.checksums(&a), spec.checksums(&b));
    // The write at offset 0 is delayed; the second lands while it waits, and a reader
    // opens then.
    let (ra, ()) = tokio::join!(w.write(0, &a, &ca, Durability::Buffered), async {
        w.write(CHUNK as u64, &b, &cb, Durability::Buffered)
            .await
            .unwrap();
        // Nothing before the landed second chunk is readable yet, and reading must not
        // condemn the replica.
        let r = store.reader(BlockId(4), GS).await.unwrap();
        assert_eq!(
            r.len(),
            0,
            "a reader sees a length not covered by landed writes"
        );
        if let Err(e) = r.read(0, 2 * CHUNK).await {
            assert!(
                !matches!(e, StoreError::ChecksumMismatch { .. }),
                "read of an in-progress replica: {e}"
            );
        }
        assert_eq!(store.get(BlockId(4)).unwrap().state, ReplicaState::Rbw);
    });
    ra.unwrap();
    // Both landed: all of it is readable and verifies, and the replica finalizes.
    let r = store.reader(BlockId(4), GS).await.unwrap();
    assert_eq!(r.len(), 2 * CHUNK as u64);
    let got = r.read(0, 2 * CHUNK).await.unwrap();
    assert_eq!(&got[..CHUNK], &a[..]);
    assert_eq!(&got[CHUNK..], &b[..]);
    drop(r);
    assert_eq!(w.finalize().await.unwrap(), 2 * CHUNK as u64);
}
