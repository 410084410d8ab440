//! Gang admission of write pipelines on an in-process cluster with few write slots per
//! node: a pipeline gets a slot on every hop or none, a busy node refuses at once, the
//! writer retries the whole pipeline; many writers over overlapping nodes all finish (no
//! deadlock) and leave no slot or replica behind.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Cluster, NAMES, pattern};
use strait::block::{BlockId, GenStamp};
use strait::pipeline::{WriteError, WriteParams};
use strait::store::ReplicaState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_writers_over_two_slots_per_node_all_finish() {
    let mut c = Cluster::start().await;
    c.limit_writes(2, Duration::from_secs(30)).await;
    // 16 writers, each 2+2 over nodes that overlap: at most 2 pipelines per node at once.
    let layouts = [
        ["a1", "a2", "b1", "b2"],
        ["a2", "a3", "b2", "b3"],
        ["a3", "a4", "b3", "b4"],
        ["a4", "a1", "b4", "b1"],
    ];
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let node = c.node(NAMES[(w % 8) as usize]).clone();
        let targets = c.ids(&layouts[(w % 4) as usize]);
        tasks.push(tokio::spawn(async move {
            let data = pattern(w + 300, 3 << 20);
            // Half of them send the setup with their first packet: a refused setup
            // then comes after hops wrote that packet, and is retried with it.
            let mut params = WriteParams::new(GenStamp(1));
            params.setup_with_first_packet = w % 2 == 1;
            let mut wr = node.writer(BlockId(300 + w), &targets, params).await?;
            wr.write(Bytes::from(data)).await?;
            wr.close().await
        }));
    }
    for (w, t) in tasks.into_iter().enumerate() {
        let out = t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("writer {w}: {e}"));
        assert_eq!(out.replicas.len(), 4, "writer {w} kept every replica");
    }
    assert!(t0.elapsed() < Duration::from_secs(60));
    let refused: u64 = NAMES
        .iter()
        .map(|n| {
            c.node(n)
                .metrics()
                .write_busy_refusals
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    assert!(refused > 0, "the slots were contended");
    for r in common::settled(&c).await {
        assert_eq!(
            (r.write_slots, r.relays),
            (0, 0),
            "a node still holds {r:?}"
        );
    }
}

/// A write from a1 to b2, open and flushed: it holds a slot on a1 and on b2.
async fn hold_b2(c: &Cluster, block: BlockId) -> strait::pipeline::Writer {
    let mut w = c
        .node("a1")
        .writer(block, &c.ids(&["a1", "b2"]), WriteParams::new(GenStamp(1)))
        .await
        .unwrap();
    w.write(Bytes::from(vec![1u8; 1000])).await.unwrap();
    w.hflush().await.unwrap();
    w
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_free_slot_refuses_and_nothing_is_left_behind() {
    let mut c = Cluster::start().await;
    c.limit_writes(1, Duration::from_secs(2)).await;
    // A write in progress holds b2's only slot.
    let holder = hold_b2(&c, BlockId(400)).await;
    // Another pipeline through a3 and b2: refused by b2 and retried, each time with its
    // only packet (a3 wrote it before b2's refusal came up, and removes it again).
    let mut params = WriteParams::new(GenStamp(1));
    params.spares = vec![];
    params.setup_with_first_packet = true;
    let blocked = {
        let node = c.node("a2").clone();
        let targets = c.ids(&["a3", "b2"]);
        tokio::spawn(async move {
            let mut w = node.writer(BlockId(401), &targets, params).await?;
            w.write(Bytes::from(vec![2u8; 1000])).await?;
            w.close().await
        })
    };
    // While it retries, a3 holds nothing between attempts for long: its slot is free
    // often enough for another writer to get through.
    let other = c
        .node("a4")
        .writer(BlockId(402), &c.ids(&["a3"]), WriteParams::new(GenStamp(1)))
        .await;
    let mut other = match other {
        Ok(w) => w,
        Err(e) => panic!("a3 stayed reserved by a refused pipeline: {e}"),
    };
    other.write(Bytes::from(vec![3u8; 10])).await.unwrap();
    other.close().await.unwrap();
    // Release b2: the blocked writer now gets through.
    holder.close().await.unwrap();
    let out = blocked.await.unwrap().expect("admitted once b2 is free");
    assert_eq!(out.replicas, c.ids(&["a3", "b2"]));
    for name in ["a3", "b2"] {
        let info = c.node(name).store().get(BlockId(401)).unwrap();
        assert_eq!((info.state, info.len), (ReplicaState::Finalized, 1000));
        let got = c
            .node("a1")
            .reader(
                BlockId(401),
                out.genstamp,
                &[c.id(name)],
                Default::default(),
            )
            .read_all()
            .await
            .unwrap();
        assert_eq!(got, vec![2u8; 1000], "{name}");
    }
    // Now hold b2 for longer than the admission timeout (2 s) of a writer that waits.
    let holder = hold_b2(&c, BlockId(403)).await;
    let e = match c
        .node("a2")
        .writer(
            BlockId(404),
            &c.ids(&["a3", "b2"]),
            WriteParams::new(GenStamp(1)),
        )
        .await
    {
        Ok(_) => panic!("admitted while b2 is held"),
        Err(e) => e,
    };
    match e {
        WriteError::Busy { node, attempts, .. } => {
            assert_eq!(node, "b2");
            assert!(attempts > 1, "retried before giving up");
        }
        other => panic!("expected Busy, got {other}"),
    }
    assert!(
        c.node("a3").store().get(BlockId(404)).is_none(),
        "no replica of the refused write on a3"
    );
    // The refused attempts gave a3's slot back (its relays wind down just after).
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.node("a3").resources().write_slots != 0 {
        assert!(Instant::now() < deadline, "a3 still holds a slot");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    holder.close().await.unwrap();
}

/// A hop opens its replica while the hops after it are set up. When its own replica
/// cannot be opened (here: it already holds the block, finalized) the hops after it were
/// set up for nothing: it tells them, they remove what they created, and only then does
/// the refusal travel upstream. Nothing of the refused write stays anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hop_that_cannot_open_its_replica_leaves_nothing_downstream() {
    let c = Cluster::start().await;
    let block = BlockId(500);
    let mut only_a2 = c
        .node("a1")
        .writer(block, &c.ids(&["a2"]), WriteParams::new(GenStamp(1)))
        .await
        .unwrap();
    only_a2.write(Bytes::from(vec![5u8; 100])).await.unwrap();
    only_a2.close().await.unwrap();

    let mut params = WriteParams::new(GenStamp(1));
    params.spares = vec![];
    let refused = c
        .node("a3")
        .writer(block, &c.ids(&["a1", "a2", "b1", "b2"]), params)
        .await;
    assert!(refused.is_err(), "a2 holds the block finalized");
    // Removed before the refusal reached the writer.
    for name in ["a1", "b1", "b2"] {
        assert!(
            c.node(name).store().get(block).is_none(),
            "{name} kept a replica of the refused write"
        );
    }
    let kept = c.node("a2").store().get(block).unwrap();
    assert_eq!((kept.state, kept.len), (ReplicaState::Finalized, 100));
    for r in common::settled(&c).await {
        assert_eq!(
            (r.write_slots, r.relays),
            (0, 0),
            "a node still holds {r:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dci_hop_is_admitted_with_the_slots_of_the_hops() {
    // 4 MB/s of DCI and the default 2 MB/s per sync pipeline: a node forwards at most two
    // sync pipelines across the link at once.
    let c = Cluster::start_with(4_000_000, 1.0).await;
    let a1 = c.node("a1").clone();
    let layouts = [["a1", "b1"].as_slice(), ["a2", "a1", "b2"].as_slice()];
    let mut tasks = Vec::new();
    for w in 0..6u64 {
        // Half start at a2, whose write slot must be given back when a1 refuses.
        let node = c.node(["a1", "a3"][(w % 2) as usize]).clone();
        let targets = c.ids(layouts[(w % 2) as usize]);
        tasks.push(tokio::spawn(async move {
            let mut wr = node
                .writer(BlockId(700 + w), &targets, WriteParams::new(GenStamp(1)))
                .await?;
            wr.write(Bytes::from(pattern(w + 700, 1 << 20))).await?;
            wr.close().await
        }));
    }
    let mut most = 0;
    while !tasks.iter().all(|t| t.is_finished()) {
        most = most.max(a1.resources().dci_slots);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for (w, t) in tasks.into_iter().enumerate() {
        let out = t
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("writer {w}: {e}"));
        assert_eq!(
            out.replicas.len(),
            2 + w % 2,
            "writer {w} kept every replica"
        );
    }
    assert_eq!(most, 2, "a1 forwarded {most} sync pipelines across at once");
    let refused = a1
        .metrics()
        .dci_busy_refusals
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(refused > 0, "the DCI slots were contended");
    for r in common::settled(&c).await {
        assert_eq!(
            (r.dci_slots, r.write_slots, r.relays),
            (0, 0, 0),
            "left held: {r:?}"
        );
    }
}
