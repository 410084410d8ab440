//! Pipeline faults through the transport's frame filter (`Transport::set_frame_filter`):
//! an in-process 2+2 cluster where one hop goes silent or dies at a chosen frame. Each
//! test states what a storage engineer expects: the failed node (and only it) is dropped,
//! the write completes on the others, every survivor holds the same finalized bytes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Cluster, pattern};
use strait::block::{BlockId, GenStamp};
use strait::node::Node;
use strait::pipeline::{WriteOutcome, WriteParams};
use strait::store::ReplicaState;
use strait::topology::NodeId;
use strait::transport::filter::{FrameAction, Hop};
use strait::wire::Frame;

const MIB: usize = 1 << 20;

async fn write(
    node: &Node,
    block: BlockId,
    targets: &[NodeId],
    data: &[u8],
) -> Result<WriteOutcome, strait::pipeline::WriteError> {
    let mut w = node
        .writer(block, targets, WriteParams::new(GenStamp(1)))
        .await?;
    for piece in data.chunks(MIB) {
        w.write(Bytes::copy_from_slice(piece)).await?;
    }
    w.close().await
}

/// Every replica in `out` is finalized at its genstamp and holds `data`.
async fn check_replicas(c: &Cluster, block: BlockId, out: &WriteOutcome, data: &[u8]) {
    for &r in &out.replicas {
        let store = c.node(c.name(r)).store();
        let info = store.get(block).expect("replica");
        assert_eq!(
            (info.state, info.genstamp, info.len),
            (ReplicaState::Finalized, out.genstamp, data.len() as u64),
            "{}",
            c.name(r)
        );
        let rd = store.reader(block, out.genstamp).await.unwrap();
        let mut got = Vec::new();
        while (got.len() as u64) < rd.len() {
            let n = (rd.len() - got.len() as u64).min(MIB as u64) as usize;
            got.extend_from_slice(&rd.read(got.len() as u64, n).await.unwrap());
        }
        assert!(got == data, "{} holds other bytes", c.name(r));
    }
}

/// A filter that applies `action` to the `nth` packet (from 1) that `from` sends to `to`,
/// and, for a stall, to everything after it on that stream.
fn on_nth_packet(
    from: NodeId,
    to: NodeId,
    nth: u64,
    action: FrameAction,
) -> Arc<dyn strait::transport::filter::FrameFilter> {
    let seen = AtomicU64::new(0);
    Arc::new(move |hop: Hop, frame: &Frame| {
        if hop != (Hop { from, to }) || !matches!(frame, Frame::Packet(_)) {
            return FrameAction::Pass;
        }
        if seen.fetch_add(1, Ordering::Relaxed) + 1 == nth {
            action
        } else {
            FrameAction::Pass
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hop_that_goes_silent_drops_only_the_node_behind_it() {
    let c = Cluster::start().await;
    let targets = c.ids(&["a1", "a2", "b1", "b2"]);
    let (a2, b1) = (c.id("a2"), c.id("b1"));
    // a2 -> b1 goes silent at the third packet: nothing more arrives, nothing closes.
    c.node("a2")
        .transport()
        .set_frame_filter(Some(on_nth_packet(a2, b1, 3, FrameAction::Stall)));
    let data = pattern(21, 8 * MIB + 5);
    let t0 = Instant::now();
    let out = write(c.node("a3"), BlockId(21), &targets, &data)
        .await
        .expect("the write completes without b1");
    let took = t0.elapsed();
    assert_eq!(out.failed, vec![b1], "only the silent node is dropped");
    assert_eq!(out.replicas, c.ids(&["a1", "a2", "b2"]));
    check_replicas(&c, BlockId(21), &out, &data).await;
    // Detected by a2 after its ack wait (5 s + 2 steps of 1 s in this cluster), well
    // before the writer's own (5 s + 4 steps), and no handover wait on top.
    assert!(took < Duration::from_secs(12), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hop_that_dies_on_the_last_packet_leaves_three_finalized_replicas() {
    let c = Cluster::start().await;
    let targets = c.ids(&["a1", "a2", "b1", "b2"]);
    let (a2, b1) = (c.id("a2"), c.id("b1"));
    let data = pattern(22, 3 * MIB + 100);
    // Packets: 1 MiB, 1 MiB, 1 MiB, then the last (100 bytes): the stream to b1 dies
    // when a2 forwards it. a1 and a2 finalize before b1's ack can come back.
    c.node("a2")
        .transport()
        .set_frame_filter(Some(on_nth_packet(a2, b1, 4, FrameAction::Kill)));
    let out = write(c.node("a3"), BlockId(22), &targets, &data)
        .await
        .expect("a write whose last packet reached three replicas is safe");
    assert_eq!(out.failed, vec![b1]);
    assert_eq!(out.replicas, c.ids(&["a1", "a2", "b2"]));
    check_replicas(&c, BlockId(22), &out, &data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_packet_is_caught_by_the_next_node() {
    let c = Cluster::start().await;
    let targets = c.ids(&["a1", "a2", "b1", "b2"]);
    let (a2, b1) = (c.id("a2"), c.id("b1"));
    c.node("a2")
        .transport()
        .set_frame_filter(Some(on_nth_packet(a2, b1, 2, FrameAction::Corrupt)));
    let data = pattern(23, 4 * MIB);
    let out = write(c.node("a3"), BlockId(23), &targets, &data)
        .await
        .expect("the write completes");
    // b1 refuses the bad packet (checksum), so it is the one dropped; no replica ever
    // holds the flipped byte.
    assert_eq!(out.failed, vec![b1]);
    check_replicas(&c, BlockId(23), &out, &data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_after_an_hflush_keeps_the_flushed_partial_chunk() {
    let c = Cluster::start().await;
    let targets = c.ids(&["a1", "a2", "b1", "b2"]);
    let (a2, b1) = (c.id("a2"), c.id("b1"));
    let data = pattern(24, 3 * 4096 + 100 + 5000);
    let flushed = 3 * 4096 + 100;
    // The first packet is the hflush; the second (it rewrites the flushed partial chunk
    // longer) kills a2 -> b1: the pipeline resumes inside that chunk, at the flushed
    // length.
    c.node("a2")
        .transport()
        .set_frame_filter(Some(on_nth_packet(a2, b1, 2, FrameAction::Kill)));
    let mut w = c
        .node("a3")
        .writer(BlockId(24), &targets, WriteParams::new(GenStamp(1)))
        .await
        .unwrap();
    w.write(Bytes::copy_from_slice(&data[..flushed]))
        .await
        .unwrap();
    w.hflush().await.unwrap();
    assert_eq!(w.acked_len(), flushed as u64);
    w.write(Bytes::copy_from_slice(&data[flushed..]))
        .await
        .unwrap();
    let out = w.close().await.unwrap();
    assert_eq!(out.failed, vec![b1]);
    check_replicas(&c, BlockId(24), &out, &data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_packet_block_whose_hop_dies_before_any_ack_resumes_at_zero() {
    let c = Cluster::start().await;
    let targets = c.ids(&["a1", "a2", "b1", "b2"]);
    let (a2, b1) = (c.id("a2"), c.id("b1"));
    // The only packet is also the last: a1 and a2 finalize it, the stream to b1 dies
    // when a2 forwards it, and the writer has no ack at all. Recovery resumes at offset
    // 0, which must be read as "resume" (keep the finalized survivors), not "create".
    c.node("a2")
        .transport()
        .set_frame_filter(Some(on_nth_packet(a2, b1, 1, FrameAction::Kill)));
    let data = pattern(23, 100);
    let out = write(c.node("a3"), BlockId(23), &targets, &data)
        .await
        .expect("recovery at offset 0 keeps the survivors");
    assert_eq!(out.failed, vec![b1]);
    assert_eq!(out.replicas, c.ids(&["a1", "a2", "b2"]));
    check_replicas(&c, BlockId(23), &out, &data).await;
}
